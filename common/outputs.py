"""The first element of a network's output list: the main logits of a segmentation model, the score of the
SAGAN discriminator (``[score, attn1, attn2]``), or the output itself when it is a single tensor (the originals'
``if isinstance(preds, list): preds = preds[0]``)."""


def first_output(output):
    """``output[0]`` of a list/tuple, else ``output``."""
    return output[0] if isinstance(output, (list, tuple)) else output
