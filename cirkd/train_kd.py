"""CIRKD ``train_kd.py`` @ 7e0d21f–50fb43c = ``train_cirkd.py`` @ 60f4425–2d8ad0f (specs/cirkd.md §1.3), which
also takes every baseline flag of the later ``train_kd.py`` (§1.4): distil DeepLabV3-ResNet101 into a student.

    python cirkd/train_kd.py --teacher-pretrained deeplabv3_resnet101_citys_best_model.pth \\
        --student-pretrained-base resnet18-imagenet.pth --data $CITYSCAPES --save-dir runs/cirkd --log-dir runs/logs
    torchrun --nproc_per_node=8 cirkd/train_kd.py ...   # --batch-size 16 is the total batch

Student loss (§3.5, §3.6): task CE (+0.4·aux) + λ_kd·KD + λ_mb·mini-batch p2p + λ_mp·memory p2p + λ_mr·memory p2r
[+ λ_skd·SKD + λ_cwd-fea·CWD(feat) + λ_cwd-logit·CWD(logits) + λ_ifv·IFV + λ_at·AT + λ_fitnet·FitNet + λ_psd·PSD
+ λ_csd·CSD + λ_adv·adversarial], a term with weight 0 is not built. The teacher (plain BN, eval mode, no_grad,
strict load) gives the targets; the projection head and the CWD/FitNet adapters are trained in the student's SGD
group; the discriminator (built when λ_adv or λ_d ≠ 0) has its own Adam with a constant lr. Files:
``<save-dir>/kd_<student-model>_<student-backbone>_<dataset>.pth`` (+ ``_best_model.pth``), only the student; log
``<log-dir>/<student-model>_<teacher-backbone>_<student-backbone>_log.txt`` (the original's name, which drops the
dataset; ``--log-name-with-dataset`` keeps it).
"""
import argparse
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.datasets.catalog import CIRKD_NUM_CLASSES
from common.engine import seed_everything
from common.engine.dist import destroy, init_distributed
from common.engine.lr import make_sgd
from common.engine.step import TrainStep
from common.errors import UserError, main_guard
from common.losses.cirkd import per_class_contrast_size
from common.methods import MethodContext, build_method, method_context, relabel
from common.numerics import resolve_amp, set_tf32
from common.recipes import cirkd
from common.recipes.options import finite_float, positive_int
from common.recipes.run import run_fields

TEACHER_HINT = ("train it with cirkd/train_scripts/train_baseline/citys/deeplabv3_res101.sh or download "
                "deeplabv3_resnet101_citys_best_model.pth (cirkd/README.md: Quick start)")
CIRKD_LAMBDAS = ("lambda_minibatch_pixel", "lambda_memory_pixel", "lambda_memory_region")
BASELINE_LAMBDAS = ("lambda_adv", "lambda_d", "lambda_skd", "lambda_cwd_fea", "lambda_cwd_logit", "lambda_ifv",
                    "lambda_fitnet", "lambda_at", "lambda_psd", "lambda_csd")
BASELINE_LABELS = {"skd": "SKD", "cwd_fea": "CWD Fea", "cwd_logit": "CWD Logit", "ifv": "IFV", "at": "AT",
                   "fitnet": "FitNet", "psd": "PSD", "csd": "CSD"}
D_INPUT = 64  # the discriminator's four stride-2 convs and final 4x4 conv need logits of at least 64x64 (§3.7)


def build_parser():
    parser = argparse.ArgumentParser(description="Semantic Segmentation Training With Pytorch")
    parser.add_argument("--teacher-model", type=str, default="deeplabv3", help="teacher model name")
    parser.add_argument("--student-model", type=str, default="deeplabv3", help="student model name")
    parser.add_argument("--student-backbone", type=str, default="resnet18", help="student backbone name")
    parser.add_argument("--teacher-backbone", type=str, default="resnet101", help="teacher backbone name")
    cirkd.add_data_flags(parser)
    parser.add_argument("--aux", action="store_true", default=False,
                        help="ignored: the aux head follows the student backbone")
    cirkd.add_training_flags(parser)
    parser.add_argument("--pixel-memory-size", type=int, default=20000, help="pixel queue length per class")
    parser.add_argument("--region-memory-size", type=int, default=2000, help="region queue length per class")
    parser.add_argument("--region-contrast-size", type=int, default=1024, help="region negatives (all classes)")
    parser.add_argument("--pixel-contrast-size", type=int, default=4096, help="pixel negatives (all classes)")
    parser.add_argument("--kd-temperature", type=finite_float, default=1.0, help="logits KD temperature")
    parser.add_argument("--contrast-kd-temperature", type=finite_float, default=1.0,
                        help="similarity-distribution KD temperature")
    parser.add_argument("--contrast-temperature", type=finite_float, default=0.1, help="similarity temperature")
    parser.add_argument("--lambda-kd", type=finite_float, default=1.0, help="weight of the logits KD")
    parser.add_argument("--lambda-minibatch-pixel", type=finite_float, default=1.0, help="weight of the mini-batch p2p")
    parser.add_argument("--lambda-memory-pixel", type=finite_float, default=0.1, help="weight of the memory p2p")
    parser.add_argument("--lambda-memory-region", type=finite_float, default=0.1, help="weight of the memory p2r")
    for flag, what in (("adv", "the generator adversarial term"), ("d", "the discriminator loss"),
                       ("skd", "SKD pair-wise"), ("cwd-fea", "CWD on the embeddings"),
                       ("cwd-logit", "CWD on the logits"), ("ifv", "IFVD"), ("fitnet", "FitNet"),
                       ("at", "attention transfer"), ("psd", "DSD pixel-wise"), ("csd", "DSD category-wise")):
        parser.add_argument(f"--lambda-{flag}", type=finite_float, default=0.0, help=f"weight of {what} (baseline KD)")
    parser.add_argument("--teacher-pretrained", type=str, default="None", help="teacher segmentation checkpoint")
    parser.add_argument("--student-pretrained-base", type=str, default="None", help="student ImageNet backbone")
    parser.add_argument("--teacher-pretrained-base", type=str, default="None", help="unused (the original's)")
    parser.add_argument("--student-pretrained", type=str, default="None", help="unused (the original's)")
    add = "added: "
    parser.add_argument("--fixed-pixel-enqueue", action="store_true",
                        help=f"{add}enqueue pixels of the class itself (the original takes raster positions "
                             "0..n-1 of the image, §8.1)")
    parser.add_argument("--minibatch-pooling", action="store_true",
                        help=f"{add}2x2 average pooling before the mini-batch relation (the README's memory saver)")
    parser.add_argument("--minibatch-group", type=positive_int, default=None, metavar="N",
                        help=f"{add}the mini-batch relation within groups of N images of each process's batch "
                             "(default: the whole batch, as the original; 2: the paper's 8 GPUs x 2 images on any "
                             "number of GPUs)")
    parser.add_argument("--log-name-with-dataset", action="store_true",
                        help=f"{add}log file <student-model>_<teacher-backbone>_<student-backbone>_<dataset>_log.txt "
                             "(the original drops the dataset)")
    return parser


def check_args(args):
    """Flags the original would run into silently or crash on; returns the crop."""
    crop = cirkd.check_training_flags(args)
    for name in ("lambda_kd", *CIRKD_LAMBDAS, *BASELINE_LAMBDAS):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(args, name)}")
    if cirkd.none_path(args.teacher_pretrained) is None:
        raise UserError(f"--teacher-pretrained is required: distilling from a random teacher is refused; "
                        f"{TEACHER_HINT}")
    if args.lambda_memory_pixel or args.lambda_memory_region:
        k = CIRKD_NUM_CLASSES[args.dataset]
        for memory, contrast in (("pixel", "pixel"), ("region", "region")):
            size = getattr(args, f"{memory}_memory_size")
            per_class = per_class_contrast_size(getattr(args, f"{contrast}_contrast_size"), k)
            if size < per_class:
                raise UserError(f"--{memory}-memory-size {size} is smaller than the {per_class} {contrast} negatives "
                                f"per class that --{contrast}-contrast-size asks for; raise the memory size")
    if (args.lambda_adv or args.lambda_d) and min(c // 8 for c in crop) < D_INPUT:
        raise UserError(f"--lambda-adv/--lambda-d need logits of at least {D_INPUT}x{D_INPUT} for the discriminator, "
                        f"but --crop-size {crop[0]} {crop[1]} gives {crop[0] // 8}x{crop[1] // 8}; use a crop of at "
                        f"least {D_INPUT * 8} {D_INPUT * 8}")
    return crop


def check_minibatch_group(args, world_size):
    """``--minibatch-group N`` must split each process's batch (``--batch-size`` / processes) into whole groups."""
    batch = args.batch_size // world_size
    if args.lambda_minibatch_pixel and args.minibatch_group and batch % args.minibatch_group:
        raise UserError(f"--minibatch-group {args.minibatch_group} does not divide the {batch} images per process "
                        f"(--batch-size {args.batch_size} over {world_size} processes); use a divisor of {batch}")


LOG_NAMES = {"cirkd.minibatch": "minibatch_pixel", "cirkd.memory_pixel": "memory_pixel",
             "cirkd.memory_region": "memory_region", "skd.pair": "skd", "cwd.feat": "cwd_fea",
             "cwd.logits": "cwd_logit", "ifvd": "ifv", "dsd.psd": "psd", "dsd.csd": "csd"}  # the original's log names
ADVERSARIAL = ("skd", "ifvd", "cwd")


def method_spec(args):
    """The catalogue methods (``common/methods``, preset "cirkd") and parameters of the flags, in the original's
    order of terms (§1.3 step 7, §1.4): kd, cirkd, skd, cwd, ifvd, at, fitnet, dsd (DSD only with both of its
    weights); the discriminator (λ_adv or λ_d ≠ 0) goes with the first adversarial baseline, else with an
    otherwise empty ``skd``."""
    methods = {
        "kd": {"weight": args.lambda_kd, "temperature": args.kd_temperature},
        "cirkd": {"minibatch": args.lambda_minibatch_pixel, "memory_pixel": args.lambda_memory_pixel,
                  "memory_region": args.lambda_memory_region, "contrast_temperature": args.contrast_temperature,
                  "contrast_kd_temperature": args.contrast_kd_temperature,
                  "pixel_memory_size": args.pixel_memory_size, "region_memory_size": args.region_memory_size,
                  "pixel_contrast_size": args.pixel_contrast_size, "region_contrast_size": args.region_contrast_size,
                  "pooling": args.minibatch_pooling, "minibatch_group": args.minibatch_group or 0,
                  "faithful_pixel_enqueue": not args.fixed_pixel_enqueue},
        "skd": {"pair": args.lambda_skd},
        "cwd": {"feat": args.lambda_cwd_fea, "logits": args.lambda_cwd_logit},
        "ifvd": {"ifv": args.lambda_ifv},
        "at": {"weight": args.lambda_at},
        "fitnet": {"weight": args.lambda_fitnet},
        "dsd": {"psd": args.lambda_psd, "csd": args.lambda_csd} if args.lambda_psd and args.lambda_csd else {},
    }
    weight_keys = {"kd": ("weight",), "cirkd": ("minibatch", "memory_pixel", "memory_region")}
    names = [name for name, params in methods.items() if any(params[k] for k in weight_keys.get(name, params))]
    if args.lambda_adv or args.lambda_d:
        carrier = next((name for name in names if name in ADVERSARIAL), None)
        if carrier is None:
            carrier = "skd"
            names.append(carrier)
        methods[carrier].update(adv=args.lambda_adv, d=args.lambda_d)
    for name in names:
        if name in ADVERSARIAL:
            methods[name].setdefault("adv", 0.0)
            methods[name].setdefault("d", 0.0)
    params = {f"{name}.{key}": value for name in names for key, value in methods[name].items()}
    return "+".join(names) or "none", params


def build_parts(args, ctx):
    """The terms (renamed as the original logs them), modules and discriminator of the flags, from the catalogue."""
    spec, params = method_spec(args)
    parts = build_method(spec, ctx, preset=None if spec == "none" else "cirkd", **params)
    parts.terms = relabel(parts.terms, LOG_NAMES)
    return parts


def contract_context(args, num_classes, aux, c_s, c_t, norm):
    """The pair as CIRKD's output contract describes it (§2.6): ``[logits, aux, feat]`` at stride 8 of
    ``--crop-size`` (no aux on a mobile student), embeddings of ``c_s`` / ``c_t`` channels."""
    h, w = (c // 8 for c in args.crop_size)
    student = {"logits": (num_classes, h, w), **({"aux": (num_classes, h, w)} if aux else {}), "feat": (c_s, h, w)}
    teacher = {"logits": (num_classes, h, w), "aux": (num_classes, h, w), "feat": (c_t, h, w)}
    return MethodContext(args.student_model, args.teacher_model, student, teacher, num_classes, cirkd.IGNORE_LABEL,
                         norm, args.max_iterations, None, tuple(args.crop_size))


def build_terms(args, num_classes, aux, c_s, c_t, norm):
    """The (terms, modules) of :func:`build_parts` for the pair of :func:`contract_context`."""
    parts = build_parts(args, contract_context(args, num_classes, aux, c_s, c_t, norm))
    return parts.terms, parts.modules


def method_of(args):
    """``results.json`` method: cirkd, the baseline names (skd, ifvd, cwd, dsd, at, fitnet), kd or baseline."""
    parts = ["cirkd"] if any(getattr(args, n) for n in CIRKD_LAMBDAS) else []
    parts += [name for name, on in (("skd", args.lambda_skd), ("ifvd", args.lambda_ifv),
                                    ("cwd", args.lambda_cwd_fea or args.lambda_cwd_logit),
                                    ("dsd", args.lambda_psd and args.lambda_csd), ("at", args.lambda_at),
                                    ("fitnet", args.lambda_fitnet)) if on]
    if parts:
        return "+".join(parts)
    return "kd" if args.lambda_kd else ("adv" if args.lambda_adv else "baseline")


def log_labels(terms, adversary):
    """The original log line's losses (§1.3 step 7), then those of the baseline terms that are on."""
    labels = [("Task Loss", "task"), ("KD Loss", "kd"), ("Mini-batch p2p Loss", "minibatch_pixel"),
              ("Memory p2p Loss", "memory_pixel"), ("Memory p2r Loss", "memory_region")]
    known = {name for _, name in labels}
    labels += [(f"{BASELINE_LABELS[t.name]} Loss", t.name) for t in terms if t.name not in known]
    if adversary is not None:
        labels += [("Adv Loss", "adv"), ("D Loss", "loss_D")]
    return labels


@main_guard
def main(argv=None):
    args = build_parser().parse_args(argv)
    crop = check_args(args)
    s_name = cirkd.network_name(args.student_model, args.student_backbone, "--student-model")
    t_name = cirkd.network_name(args.teacher_model, args.teacher_backbone, "--teacher-model")
    aux = cirkd.derive_aux(args.student_backbone)
    set_tf32(args.tf32)
    torch.backends.cudnn.benchmark = False
    info = init_distributed(cirkd.resolve_device_flag(args))
    check_minibatch_group(args, info.world_size)
    seed_everything(args.seed)  # the same seed on every rank: identical initial student, head and queues
    num_classes = CIRKD_NUM_CLASSES[args.dataset]
    norm = cirkd.resolve_norm(args.norm, info)
    teacher = cirkd.build_network(t_name, num_classes, "batchnorm")
    cirkd.load_weights(teacher, args.teacher_pretrained, "--teacher-pretrained", TEACHER_HINT)
    student = cirkd.build_network(s_name, num_classes, norm, args.student_pretrained_base,
                                  flag="--student-pretrained-base")
    device = info.device
    student, teacher = student.to(device), teacher.to(device)
    ctx = method_context(student, teacher, num_classes=num_classes, ignore_index=cirkd.IGNORE_LABEL, norm=norm,
                         total_steps=args.max_iterations, crop=crop, student_name=s_name, teacher_name=t_name)
    parts = build_parts(args, ctx)
    terms, modules, adversary = parts.terms, parts.modules, parts.adversary
    params = itertools.chain(student.parameters(), *(m.parameters() for m in modules.values()))
    optimizer = make_sgd(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    step = TrainStep(student, task=cirkd.task_term(aux), optimizer=optimizer, base_lr=args.lr, device=device,
                     teacher=teacher, terms=terms, modules=modules, adversary=adversary,
                     amp=resolve_amp(args.amp, device, args.amp_dtype), total_name="loss", log_adversarial=False)

    stem = f"kd_{args.student_model}_{args.student_backbone}_{args.dataset}"
    log_parts = [args.student_model, args.teacher_backbone, args.student_backbone]
    log_parts += [args.dataset] if args.log_name_with_dataset else []
    imagenet = cirkd.none_path(args.student_pretrained_base)
    lambdas = {name: getattr(args, name) for name in ("lambda_kd", *CIRKD_LAMBDAS, *BASELINE_LAMBDAS)
               if getattr(args, name)}
    fields = run_fields("cirkd", method_of(args), model=s_name, dataset=cirkd.DATASET_NAMES[args.dataset],
                        iterations=args.max_iterations, crop=crop, batch=args.batch_size, seed=args.seed,
                        teacher=t_name, extra={"weights": lambdas, "teacher_ckpt": args.teacher_pretrained,
                                               "student_pretrained_base": imagenet,
                                               "imagenet_init": imagenet is not None,
                                               "faithful_pixel_enqueue": not args.fixed_pixel_enqueue})
    cirkd.train(args, step, info, crop=crop, stem=stem, log_file="_".join(log_parts) + "_log.txt",
                labels=log_labels(terms, adversary), fields=fields, logger_name="cirkd.train_kd")
    destroy()


if __name__ == "__main__":
    main()
