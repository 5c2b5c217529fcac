"""Argparse helpers shared by the entry points of every lineage (the originals' ``options.py``, DESIGN.md
"Fidelity").

``str2bool`` is the originals' boolean parser; ``finite_float`` is the type of every float flag (nan and
inf refused); ``size_pair`` parses ``--input-size h,w``;
``add_runtime_flags`` adds the flags every entry point gained (``--device``, ``--norm``, and for
training ``--seed``, ``--amp``, ``--num-workers``, ``--resume``), which never change the original
behaviour at their defaults; ``apply_gpu`` is the originals' GPU convention.
"""
import argparse
import math
import os

from common.models.norm import ABN_NORMS


def str2bool(value):
    """The original ``str2bool``: yes/true/t/y/1 and no/false/f/n/0 in any case."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), got {value!r}")


def finite_float(text):
    """A float that is neither nan nor ±inf: the type of every float flag (``--lr nan`` trained to the end)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def size_pair(text):
    """``"h,w"`` -> ``(h, w)`` of positive ints (``--input-size``)."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size must read 'h,w' (e.g. 512,512), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return h, w


def non_negative_int(text):
    """An int >= 0 (``--num-workers``, ``--state-every``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer >= 0 expected, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text):
    """An int > 0 (CIRKD's ``--crop-size H W``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer > 0 expected, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def size_text(text):
    """``"h,w"`` checked like :func:`size_pair` but kept as given (CWD stores ``--input-size`` as text)."""
    size_pair(text)
    return text


def add_runtime_flags(parser, *, training=False, outputs=None, state_file=None, seed=0,
                      seed_help="seed of random/numpy/torch (the original: 0)", num_workers=4,
                      amp_help="mixed-precision forwards (losses stay fp32)", added="added: ",
                      norms=ABN_NORMS, norm_help=None):
    """``--device``, ``--norm`` (``norms``: its choices, ``norm_help``: its help; default the PSP lineage's In-Place
    ABN norms) and, when ``outputs`` (its help) is given, ``--outputs-dir`` (default ./outputs).

    With ``training`` also ``--seed``, ``--amp``, ``--num-workers``, ``--resume`` and, when ``state_file``
    (where the state goes) is given, ``--state-every``. ``added`` prefixes the help of flags the original
    did not have ("" for entry points without an original).
    """
    parser.add_argument("--device", default="auto",
                        help=f"{added}auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--norm", default="auto" if "auto" in norms else norms[0], choices=norms,
                        help=f"{added}" + (norm_help or "In-Place ABN backend: inplace_abn (compiled extension), abn "
                                           "(pure-PyTorch reference, same math), auto (inplace_abn when built, else "
                                           "abn), bn (old name of abn)"))
    parser.add_argument("--tf32", action="store_true",
                        help=f"{added}allow TF32 convolutions and matmuls on Ampere+ GPUs (originals: full fp32)")
    if outputs is not None:
        parser.add_argument("--outputs-dir", type=str, default="./outputs", help=f"{added}{outputs}")
    if not training:
        return
    parser.add_argument("--seed", type=int, default=seed, help=f"{added}{seed_help}")
    parser.add_argument("--amp", action="store_true", help=f"{added}{amp_help}: bf16 on CPU, fp16 with a "
                                                                        "GradScaler on CUDA (see --amp-dtype)")
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), default=None,
                        help=f"{added}the autocast dtype of --amp (default: bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--num-workers", type=non_negative_int, default=num_workers,
                        help=f"{added}training loader workers" + (f" (original {num_workers})" if added else ""))
    parser.add_argument("--resume", type=str, default=None, help=f"{added}continue from a training_state.pth "
                                                                 "(models, optimizers, step, RNG, data position)")
    if state_file is not None:
        parser.add_argument("--state-every", type=non_negative_int, default=1000,
                            help=f"{added}write {state_file} every N steps (0: only at the save/evaluation points)")


def apply_gpu(gpu):
    """The original ``os.environ['CUDA_VISIBLE_DEVICES'] = args.gpu``, skipped for the default 'None'."""
    if gpu not in ("None", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
