"""SKD journal code ``utils/train_options.py`` (specs/ifvd_skd.md §B.2.3, §B.2.4): every original flag and default.

Added flags (``--device``, ``--norm``, ``--seed``, ``--amp``, ``--num-workers``, ``--resume``, ``--state-every``,
``--outputs-dir``, ``--log-dir``, ``--data-listval``, ``--save-steps``, ``--teacher-model``) never change the
original behaviour at their defaults. ``--data-list`` was ignored by the original (the train list was hard-coded);
here it defaults to that same list and is honoured when given.
"""
import argparse

from common.recipes.options import add_runtime_flags, finite_float, size_pair, str2bool
from common.recipes.psp import TEACHER, TEACHERS

SAVE_PATH = "save_path"  # the literal folder name of the original's overrides (§B.2.2 step 1)
OUTPUTS_HELP = "folder of the prediction PNGs (original ./outputs; '' writes none during training)"


def train_parser():
    """``TrainOptions`` (§B.2.3) plus the added flags."""
    p = argparse.ArgumentParser(prog="python skd/train_and_eval.py",
                                description="SKD (journal code): distil PSPNet-R101 into PSPNet-R18 on Cityscapes "
                                            "with pixel-wise, pair-wise and holistic distillation.")
    p.add_argument("--data_set", type=str, default="cityscape", help="log-file tag")
    p.add_argument("--classes_num", type=int, default=19, help="number of classes (Cityscapes trainIds: 19)")
    p.add_argument("--T_ckpt_path", type=str, default="./ckpt/Teacher/CS_scenes_38413_0.7832174615268139.pth",
                   help="teacher weights (toolbox head.0/head.1 keys are remapped)")
    p.add_argument("--S_resume", type=str2bool, default=True,
                   help="without ImageNet init: load <S_ckpt_path>/model_best.pth.tar when it exists")
    p.add_argument("--S_ckpt_path", type=str, default="./dataset/resnet18-imagenet.pth",
                   help=f"overwritten with ./ckpt/{SAVE_PATH}/Student, as in the original")
    p.add_argument("--D_resume", type=str2bool, default=True, help="load <D_ckpt_path>/model_best.pth.tar if present")
    p.add_argument("--D_ckpt_path", type=str, default="",
                   help=f"overwritten with ./ckpt/{SAVE_PATH}/Distriminator, as in the original")
    p.add_argument("--batch-size", type=int, default=8, help="total batch (split over torchrun processes)")
    p.add_argument("--start_epoch", type=int, default=0, help="unused, as in the original")
    p.add_argument("--epoch_nums", type=int, default=1, help="one 'epoch' is the whole num-steps loader")
    p.add_argument("--parallel", type=str, default="True", help="accepted; no effect (one module, or torchrun)")
    p.add_argument("--data-dir", type=str, default="", help="Cityscapes root")
    p.add_argument("--data-list", type=str, default=None,
                   help="train list (the original always used ./dataset/list/cityscapes/train.lst; default: shipped)")
    p.add_argument("--ignore-label", type=int, default=255, help="parsed but unused, as in the original")
    p.add_argument("--input-size", type=size_pair, default=(512, 512), help="training crop 'h,w'")
    p.add_argument("--is-training", action="store_true", help="unused, as in the original")
    p.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum of G and D")
    p.add_argument("--num-steps", type=int, default=40000, help="training steps")
    p.add_argument("--power", type=finite_float, default=0.9, help="poly learning-rate power")
    p.add_argument("--random-mirror", action="store_true", help="random horizontal flip (off unless given)")
    p.add_argument("--random-scale", action="store_true", help="random rescale (off unless given)")
    p.add_argument("--snapshot-dir", type=str, default="./snapshots/",
                   help="folder of the evaluated student snapshots CS_scenes_<step>_<mIoU>.pth and results.json")
    p.add_argument("--weight-decay", type=finite_float, default=1e-4, help="of G and D (the script passes 5e-4)")
    p.add_argument("--gpu", type=str, default="None", help="only counted, as in the original; use --device")
    p.add_argument("--recurrence", type=int, default=1, help="unused, as in the original")
    p.add_argument("--last-step", type=int, default=0, help="the first step is last-step + 1")
    p.add_argument("--is-student-load-imgnet", type=str2bool, default=True,
                   help="True/False: initialise the student backbone from --student-pretrain-model-imgnet")
    p.add_argument("--student-pretrain-model-imgnet", type=str, default="None",
                   help="deep-stem ResNet-18 ImageNet weights (the script passes ./dataset/resnet18-imagenet.pth)")
    p.add_argument("--pi", type=str2bool, default=True, help="pixel-wise distillation")
    p.add_argument("--pa", type=str2bool, default=True, help="pair-wise distillation")
    p.add_argument("--ho", type=str2bool, default=True, help="holistic (adversarial) distillation")
    p.add_argument("--adv-loss-type", type=str, default="wgan-gp", help="wgan-gp or hinge")
    p.add_argument("--imsize-for-adv", type=int, default=65, help="must be 65, as in the original")
    p.add_argument("--adv-conv-dim", type=int, default=64, help="must be 64, as in the original")
    p.add_argument("--lambda-gp", type=finite_float, default=10.0, help="weight of the WGAN gradient penalty")
    p.add_argument("--lambda-d", type=finite_float, default=0.1, help="weights the G adversarial term and the D loss")
    p.add_argument("--lambda-pi", type=finite_float, default=10.0, help="weight of the pixel-wise term")
    p.add_argument("--lambda-pa", type=finite_float, default=1.0, help="the script passes 0.5")
    p.add_argument("--pool-scale", type=finite_float, default=0.5,
                   help="pooling scale of the pair-wise term, in (0, 1]")
    p.add_argument("--preprocess-GAN-mode", type=int, default=1, help="1 = BatchNorm, 2 = tanh, 3 = 2(x/255-0.5)")
    p.add_argument("--lr-g", type=finite_float, default=1e-2, help="learning rate of the student (SGD)")
    p.add_argument("--lr-d", type=finite_float, default=4e-4, help="learning rate of the discriminator (SGD)")
    p.add_argument("--best-mean-IU", type=finite_float, default=0.0, help="stored and unused, as in the original")
    add_runtime_flags(p, training=True, outputs=OUTPUTS_HELP, state_file="<log-dir>/training_state.pth", seed=None,
                      seed_help="seed everything (the original sets no seed)")
    p.add_argument("--data-listval", type=str, default=None,
                   help="added: val list (the original's hard-coded ./dataset/list/cityscapes/val.lst)")
    p.add_argument("--save-steps", type=int, default=None,
                   help="added: evaluation period near the end (default int(2975 / batch-size) = 371, as the original)")
    p.add_argument("--teacher-model", default=TEACHER, choices=TEACHERS,
                   help=f"added: teacher architecture (demo/tests use a small one; the original is {TEACHER})")
    p.add_argument("--log-dir", type=str, default=f"./ckpt/log/{SAVE_PATH}", help="added: log folder (original value)")
    return p


def prediction_parser():
    """``TrainOptionsForTest`` (§B.2.4) plus the added flags."""
    p = argparse.ArgumentParser(prog="python skd/test.py",
                                description="SKD (journal code): Cityscapes test predictions of a PSPNet-R18 student.")
    p.add_argument("--data-dir", type=str, default="", help="Cityscapes root")
    p.add_argument("--resume-from", type=str, default="", help="student state_dict, e.g. CS_scenes_39326_0.75.pth")
    p.add_argument("--data-list", type=str, default=None,
                   help="added: test list (the original's hard-coded ./dataset/list/cityscapes/test.lst)")
    add_runtime_flags(p, outputs=OUTPUTS_HELP)
    return p

