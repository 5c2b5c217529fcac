"""IFVD's ``options.py`` (specs/ifvd_skd.md §A.2.2, §A.2.3): every original flag with its original default.

Added flags (``--device``, ``--norm``, ``--seed``, ``--amp``, ``--num-workers``, ``--resume``,
``--state-every``, ``--outputs-dir``, ``--teacher-model``, ``--results``) never change the original
behaviour at their defaults. ``--data-list``/``--data-listval`` default to the shipped Cityscapes lists
(the original's ``./dataset/list/cityscapes/*.lst``), else ``<data-dir>/lists/<split>.lst``.
"""
import argparse

from common.recipes.options import add_runtime_flags, finite_float, size_pair, str2bool
from common.recipes.psp import STUDENT, TEACHER, TEACHERS

OUTPUTS_HELP = "folder of the prediction PNGs (original ./outputs; '' writes none)"


def train_parser():
    """``TrainOptions`` (§A.2.2) plus the added flags."""
    p = argparse.ArgumentParser(prog="python ifvd/train.py",
                                description="IFVD: distil PSPNet-R101 into PSPNet-R18 on Cityscapes.")
    p.add_argument("--data_set", type=str, default="city", help="tag of the log and checkpoint names")
    p.add_argument("--num_classes", type=int, default=19, help="number of classes (19)")
    p.add_argument("--data-dir", type=str, default="/workdir/cityscapes", help="Cityscapes root")
    p.add_argument("--data-list", type=str, default=None,
                   help="train list (original ./dataset/list/cityscapes/train.lst; default: the shipped list)")
    p.add_argument("--data-listval", type=str, default=None,
                   help="val list of the evaluation (original ./dataset/list/cityscapes/val.lst; default: shipped)")
    p.add_argument("--ignore-label", type=int, default=255, help="parsed but unused, as in the original (255 is fixed)")
    p.add_argument("--input-size", type=size_pair, default=(512, 512), help="training crop 'h,w'")
    p.add_argument("--random-mirror", action="store_true", help="random horizontal flip (off unless given)")
    p.add_argument("--random-scale", action="store_true", help="random rescale in [0.7, 2.1] (off unless given)")
    p.add_argument("--T_ckpt_path", type=str, default="./ckpt/teacher_city.pth", help="teacher weights (required)")
    p.add_argument("--S_resume", type=str2bool, default=False, help="True/False: load the student from --S_ckpt_path")
    p.add_argument("--S_ckpt_path", type=str, default="", help="student state_dict (or {'state_dict', 'step'})")
    p.add_argument("--D_resume", type=str2bool, default=False,
                   help="True/False: load the discriminator from --D_ckpt_path")
    p.add_argument("--D_ckpt_path", type=str, default="", help="discriminator state_dict for --D_resume")
    p.add_argument("--is-student-load-imgnet", type=str2bool, default=True,
                   help="True/False: initialise the student backbone from --student-pretrain-model-imgnet")
    p.add_argument("--student-pretrain-model-imgnet", type=str, default="./ckpt/resnet18-imagenet.pth",
                   help="deep-stem ResNet-18 ImageNet weights")
    p.add_argument("--gpu", type=str, default="None",
                   help="written to CUDA_VISIBLE_DEVICES when given (the original's default 'None' hid all GPUs)")
    p.add_argument("--batch-size", type=int, default=8, help="total batch (split over torchrun processes)")
    p.add_argument("--num-steps", type=int, default=40000, help="training steps")
    p.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum")
    p.add_argument("--power", type=finite_float, default=0.9, help="poly learning-rate power")
    p.add_argument("--lr-g", type=finite_float, default=1e-2, help="learning rate of the student (SGD)")
    p.add_argument("--weight-decay", type=finite_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--last-step", type=int, default=0, help="first step (with --S_resume; prefer --resume)")
    p.add_argument("--kd", type=str2bool, default=True, help="True/False: pixel-wise KD on the logits")
    p.add_argument("--lambda-kd", type=finite_float, default=10.0, help="weight of the pixel-wise KD term")
    p.add_argument("--adv", type=str2bool, default=True,
                   help="True/False: adversarial (holistic) term with a discriminator")
    p.add_argument("--lambda-adv", type=finite_float, default=0.001,
                   help="weight of the adversarial term of the student")
    p.add_argument("--preprocess-GAN-mode", type=int, default=1, help="1 = BatchNorm, 2 = tanh, 3 = 2(x/255-0.5)")
    p.add_argument("--adv-loss-type", type=str, default="wgan-gp", help="wgan-gp or hinge")
    p.add_argument("--imsize-for-adv", type=int, default=65, help="must be 65, as in the original")
    p.add_argument("--adv-conv-dim", type=int, default=64, help="must be 64, as in the original")
    p.add_argument("--lambda-gp", type=finite_float, default=10.0, help="weight of the WGAN gradient penalty")
    p.add_argument("--lambda-d", type=finite_float, default=0.1, help="weight of the discriminator loss")
    p.add_argument("--lr-d", type=finite_float, default=4e-4, help="learning rate of the discriminator (Adam)")
    p.add_argument("--ifv", type=str2bool, default=True, help="True/False: intra-class feature variation distillation")
    p.add_argument("--lambda-ifv", type=finite_float, default=200.0, help="weight of the IFV term")
    p.add_argument("--save-name", type=str, default="exp", help="run folder name under --save-dir")
    p.add_argument("--save-dir", type=str, default="ckpt", help="folder of the run folders")
    p.add_argument("--save-ckpt-start", type=int, default=40000, help="first save/evaluation point (steps)")
    p.add_argument("--save-ckpt-every", type=int, default=200, help="save/evaluation period after the start")
    add_runtime_flags(p, training=True, outputs=OUTPUTS_HELP, state_file="<save-dir>/<save-name>/training_state.pth")
    p.add_argument("--teacher-model", default=TEACHER, choices=TEACHERS,
                   help=f"added: teacher architecture (demo/tests use a small one; the original is {TEACHER})")
    return p


def eval_parser(kind):
    """``ValOptions`` (kind "val") / ``TestOptions`` (kind "test") (§A.2.3) plus the added flags."""
    action = "Evaluate an IFVD student on Cityscapes val" if kind == "val" else "Write Cityscapes test predictions"
    p = argparse.ArgumentParser(prog=f"python ifvd/{kind}.py", description=f"{action} (whole image, scale 1.0).")
    p.add_argument("--data-dir", type=str, default="/workdir/cityscapes", help="Cityscapes root")
    p.add_argument("--data-list", type=str, default=None,
                   help=f"original ./dataset/list/cityscapes/{kind}.lst; default: the shipped list")
    p.add_argument("--num_classes", type=int, default=19, help="number of classes (19)")
    p.add_argument("--restore-from", type=str, default="", help="student state_dict, e.g. ckpt/exp/city_39999_G.pth")
    p.add_argument("--gpu", type=str, default="None", help="written to CUDA_VISIBLE_DEVICES when given")
    add_runtime_flags(p, outputs=OUTPUTS_HELP)
    p.add_argument("--model", default=STUDENT, choices=(STUDENT, TEACHER),
                   help="added: the network of --restore-from (pspnet_resnet101 evaluates a teacher)")
    if kind == "val":
        p.add_argument("--results", type=str, default=None,
                       help="added: results.json path (default: next to --restore-from)")
        p.add_argument("--method", type=str, default=None,
                       help="added: results.json method (default: teacher for pspnet_resnet101, else ifvd)")
        p.add_argument("--checkpoint-tag", type=str, default=None,
                       help="added: results.json extra.checkpoint (default: the file stem; 'released' for the "
                            "released weights, as make tables expects)")
    return p

