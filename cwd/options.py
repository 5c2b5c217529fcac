"""The original ``options.py`` of SemSeg-distill (specs/cwd.md §3.1): every flag with its default.

Added flags (``--device``, ``--seed``, ``--resume``, ``--amp``, ``--norm``, ``--num-workers``,
``--state-every``, ``--outputs-dir``) never change the original behaviour at their defaults.

Demo preset (``SEGKD_DEMO=1``, ``make demo``): the defaults of the data lists, crop, batch, number of
steps, teacher checkpoint and ImageNet init change to the small synthetic set-up below (crop 96,96, or
503,503 with ``--adv True``: the discriminator's minimum); every other default, and every flag given on
the command line, stays as it is. ``SEGKD_DEMO_STEPS``,
``SEGKD_DEMO_CROP`` ("h,w"), ``SEGKD_DEMO_BATCH`` and ``SEGKD_DEMO_TEACHER`` override the preset.
"""
import argparse
import os
from pathlib import Path

from common.errors import UserError
from common.recipes.options import add_runtime_flags, finite_float, size_text, str2bool
from common.recipes.psp import TEACHER, TEACHERS, smallest_adv_crop
from common.recipes.psp import resolve_list as resolve_shipped_list

DEMO_DATA_DIR = "./demo_data/cityscapes"
DEMO_TEACHER = "./demo_runs/teacher/teacher_city.pth"
DEMO_STEPS = 100
DEMO_CROP = "96,96"
ADV_CROP = "{0},{0}".format(smallest_adv_crop())  # the discriminator's minimum (503,503)
DEMO_BATCH = 4


def demo_enabled():
    """Whether the demo preset is active (``SEGKD_DEMO`` set to anything but "" or "0")."""
    return os.environ.get("SEGKD_DEMO", "") not in ("", "0")


def demo_preset():
    """The defaults the demo preset replaces (train.py), from the constants and the SEGKD_DEMO_* overrides."""
    steps = int(os.environ.get("SEGKD_DEMO_STEPS", DEMO_STEPS))
    return {
        "input_size": os.environ.get("SEGKD_DEMO_CROP"),  # None: demo_crop(--adv)
        "batch_size": int(os.environ.get("SEGKD_DEMO_BATCH", DEMO_BATCH)),
        "num_steps": steps,
        "save_ckpt_start": steps,
        "T_ckpt_path": os.environ.get("SEGKD_DEMO_TEACHER", DEMO_TEACHER),
        "is_student_load_imgnet": False,
        "num_workers": 0,
    }


def train_parser():
    """``TrainOptions``: the original flags and defaults (§3.1) plus the added ones."""
    p = argparse.ArgumentParser(prog="python cwd/train.py",
                                description="CWD distillation of PSPNet-R18 from PSPNet-R101.")
    b = "True/False"
    p.add_argument("--local_rank", type=int, default=0, help="unused (as in the original; torchrun sets LOCAL_RANK)")
    p.add_argument("--data_set", type=str, default="city", help="prefix of the checkpoint names")
    p.add_argument("--num_classes", type=int, default=19, help="number of classes (Cityscapes trainIds: 19)")
    p.add_argument("--data-dir", type=str, default="/workdir/cityscapes", help="Cityscapes root")
    p.add_argument("--data-list", type=str, default=None,
                   help="training list (original ./dataset/list/cityscapes/train.lst; default: the shipped list)")
    p.add_argument("--data-listval", type=str, default=None,
                   help="list of the final evaluation (original ./dataset/list/cityscapes/val.lst; default: shipped)")
    p.add_argument("--ignore-label", type=int, default=255, help="parsed but unused, as in the original")
    p.add_argument("--input-size", type=size_text, default="512,512",
                   help=f"training crop 'h,w' (--adv needs at least {ADV_CROP})")
    p.add_argument("--random-mirror", action="store_true", help="random horizontal flip (off unless given)")
    p.add_argument("--random-scale", action="store_true", help="random rescale (off unless given)")
    p.add_argument("--T_ckpt_path", type=str, default="./ckpt/teacher_city.pth", help="teacher weights (required)")
    p.add_argument("--teacher-model", default=TEACHER, choices=TEACHERS,
                   help="added: teacher architecture (original: pspnet_resnet101; the demo uses pspnet_resnet18)")
    p.add_argument("--S_resume", type=str2bool, default=False, help=f"{b}: load the student from --S_ckpt_path")
    p.add_argument("--S_ckpt_path", type=str, default="",
                   help="student state_dict (or {'state_dict', 'step'}) for --S_resume")
    p.add_argument("--D_resume", type=str2bool, default=False,
                   help=f"{b}: load the discriminator from --D_ckpt_path")
    p.add_argument("--D_ckpt_path", type=str, default="", help="discriminator state_dict for --D_resume")
    p.add_argument("--is-student-load-imgnet", type=str2bool, default=True,
                   help=f"{b}: initialise the student backbone from --student-pretrain-model-imgnet")
    p.add_argument("--student-pretrain-model-imgnet", type=str, default="./ckpt/resnet18-imagenet.pth",
                   help="deep-stem ResNet-18 ImageNet weights")
    p.add_argument("--gpu", type=str, default="None", help="ignored by train.py, as in the original; use --device")
    p.add_argument("--batch-size", type=int, default=8, help="total batch (split over torchrun processes)")
    p.add_argument("--num-steps", type=int, default=40000, help="training steps")
    p.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum")
    p.add_argument("--power", type=finite_float, default=0.9, help="poly learning-rate power")
    p.add_argument("--lr-g", type=finite_float, default=1e-2, help="learning rate of the student (SGD)")
    p.add_argument("--weight-decay", type=finite_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--last-step", type=int, default=0, help="first step (with --S_resume; prefer --resume)")
    p.add_argument("--kd", type=str2bool, default=True, help=f"{b}: pixel-wise KD on the logits")
    p.add_argument("--lambda-kd", type=finite_float, default=10.0, help="weight of the pixel-wise KD term")
    p.add_argument("--cwd", type=str2bool, default=True, help=f"{b}: channel-wise distillation")
    p.add_argument("--cwd-feat", type=str2bool, default=False,
                   help=f"{b}: CWD on the PSP features through the 128->512 adapter instead of the logits")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="CWD temperature tau (kl only)")
    p.add_argument("--lambda-cwd", type=finite_float, default=1.0, help="weight of the CWD term")
    p.add_argument("--norm-type", type=str, default="none",
                   help="CWD normalisation: channel, spatial, channel_mean or none")
    p.add_argument("--divergence", type=str, default="kl", help="CWD divergence: kl or mse")
    p.add_argument("--adv", type=str2bool, default=False, help=f"{b}: adversarial (GAN) term with a discriminator")
    p.add_argument("--lambda-adv", type=finite_float, default=0.001,
                   help="weight of the adversarial term of the student")
    p.add_argument("--preprocess-GAN-mode", type=int, default=1,
                   help="discriminator input: 1 = BatchNorm, 2 = tanh, 3 = 2(x/255-0.5)")
    p.add_argument("--adv-loss-type", type=str, default="wgan-gp", help="adversarial loss: wgan-gp or hinge")
    p.add_argument("--imsize-for-adv", type=int, default=65, help="must be 65, as in the original")
    p.add_argument("--adv-conv-dim", type=int, default=64, help="discriminator width (original 64)")
    p.add_argument("--lambda-gp", type=finite_float, default=10.0, help="weight of the WGAN gradient penalty")
    p.add_argument("--lambda-d", type=finite_float, default=0.1, help="weight of the discriminator loss")
    p.add_argument("--lr-d", type=finite_float, default=4e-4, help="learning rate of the discriminator (Adam)")
    p.add_argument("--ifv", type=str2bool, default=False, help="dead in CWD (accepted, has no effect)")
    p.add_argument("--lambda-ifv", type=finite_float, default=200.0, help="dead in CWD (accepted, has no effect)")
    p.add_argument("--save-name", type=str, default="exp", help="run folder name under --save-dir")
    p.add_argument("--save-dir", type=str, default="ckpt", help="folder of the run folders")
    p.add_argument("--save-ckpt-start", type=int, default=40000, help="first save/evaluation point (steps)")
    p.add_argument("--save-ckpt-every", type=int, default=1000, help="save/evaluation period after the start")
    add_runtime_flags(p, training=True, state_file="<run>/training_state.pth",
                      outputs="where the evaluations write their prediction PNGs (original ./outputs)")
    if demo_enabled():
        p.set_defaults(**demo_preset())
    return p


def demo_crop(adv):
    """The demo preset's crop when neither --input-size nor SEGKD_DEMO_CROP gives one: 96,96, or the smallest
    crop the discriminator accepts with ``--adv``."""
    return ADV_CROP if adv else DEMO_CROP


def eval_parser(kind):
    """``ValOptions`` (kind "val") and ``TestOptions`` (kind "test"): the original five flags plus added ones."""
    p = argparse.ArgumentParser(prog=f"python cwd/{kind}.py",
                                description=f"{'Evaluate' if kind == 'val' else 'Write test-server predictions of'} "
                                            "a CWD student checkpoint.")
    p.add_argument("--data-dir", type=str, default="/workdir/cityscapes", help="Cityscapes root")
    p.add_argument("--data-list", type=str, default=None,
                   help=f"original ./dataset/list/cityscapes/{kind}.lst; default: the shipped list")
    p.add_argument("--num_classes", type=int, default=19, help="number of classes (19)")
    p.add_argument("--restore-from", type=str, default="", help="student checkpoint (city_39999_G.pth)")
    p.add_argument("--gpu", type=str, default="None", help="accepted for compatibility; use --device")
    add_runtime_flags(p, outputs="prediction PNG folder (original ./outputs)")
    if kind == "val":
        p.add_argument("--results", type=str, default=None,
                       help="added: results.json path (default: next to --restore-from)")
    return p


def resolve_list(path, split, data_dir):
    """``path`` if given; otherwise ``<data_dir>/lists/<split>.lst`` under the demo preset, else the shipped list."""
    if path or not demo_enabled():
        return resolve_shipped_list(path, split, data_dir)
    local = Path(data_dir) / "lists" / f"{split}.lst"
    if not local.is_file():
        raise UserError(f"demo list {local} does not exist; generate the demo data with "
                        f"`python -m common.datasets.synthetic cityscapes {data_dir}` or unset SEGKD_DEMO")
    return str(local)
