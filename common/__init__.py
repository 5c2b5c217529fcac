"""segkd: five semantic-segmentation knowledge-distillation papers on modern PyTorch."""

__version__ = "0.1.0"
