"""IFVD ``train.py`` (specs/ifvd_skd.md §A.2.1, §A.4.6, §A.6): distil PSPNet-R101 into PSPNet-R18.

Student loss ``CE + 0.4·CE_aux + 10·KD + 0.001·(−mean D(z_S)) + 200·IFV``, then one WGAN-GP
discriminator step (Adam) per G step, both on the poly schedule with it = 0..N-1
(common/engine/distill.py). Seeds 0 and deterministic cuDNN, as the original sets at import. At
each save point (by default only step 39 999) it writes ``<data_set>_<step>_G.pth`` (+ ``_D.pth``
with ``--adv``), evaluates the student on val (whole image) and writes ``results.json`` beside them.
"""
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader, Subset

from common.datasets.cityscapes import CSTrainValSet
from common.engine import (
    HookBase,
    Logging,
    LRSchedule,
    PeriodicCheckpoint,
    ResumableSampler,
    RunLogger,
    SeededDataset,
    Trainer,
    atomic_save,
    barrier,
    init_distributed,
    load_training_state,
    save_training_state,
    seed_everything,
    worker_init_fn,
)
from common.engine.distill import DistillStep, DistillTerm, build_d_optimizer, build_g_optimizer
from common.errors import UserError, main_guard
from common.evaluation import evaluate_main, write_results_json
from common.losses.adversarial import check_adv_type
from common.losses.ifvd import IntraClassFeatureVariation
from common.losses.kd import PixelKL
from common.losses.segmentation import CriterionDSN
from common.models import Discriminator, build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from ifvd.options import STUDENT, apply_gpu, resolve_list, train_parser

TEACHER_HINT = ("download teacher_city.pth (ifvd/README.md, Quick start) into ./ckpt/ or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("download resnet18-imagenet.pth (ifvd/README.md, Quick start) into ./ckpt/, pass "
                 "--student-pretrain-model-imgnet, or train from scratch with --is-student-load-imgnet False")


def logits_size(n):
    """Side of the stride-8 map for an input side ``n`` (deep stem, ceil-mode max-pool; 512 -> 65)."""
    n = (n - 1) // 2 + 1
    n = -(-(n - 1) // 2) + 1
    return (n - 1) // 2 + 1


def check_args(args):
    """Reject flag values the original crashed or hung on, with the fix (§A.9 items 2, 7, 10)."""
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} is too small: batch-norm in training needs at least 2 images")
    if args.num_steps <= 0 or not 0 <= args.last_step <= args.num_steps:
        raise UserError(f"--num-steps {args.num_steps} / --last-step {args.last_step}: need 0 <= last-step <= steps")
    if args.num_classes < 1:
        raise UserError(f"--num_classes must be positive, got {args.num_classes}")
    if args.save_ckpt_every <= 0:
        raise UserError(f"--save-ckpt-every must be positive, got {args.save_ckpt_every}")
    if args.adv:
        check_adv_type(args.adv_loss_type)
        if args.imsize_for_adv != 65:
            raise UserError(f"--imsize-for-adv must be 65 (the discriminator has no layer l4 otherwise), "
                            f"got {args.imsize_for_adv}")
        if args.preprocess_GAN_mode not in (1, 2, 3):
            raise UserError(f"--preprocess-GAN-mode must be 1, 2 or 3, got {args.preprocess_GAN_mode}")
        crop = args.input_size
        if min(logits_size(c) for c in crop) < 64:
            raise UserError(f"--adv needs logits of at least 64x64 for the discriminator, but --input-size "
                            f"{crop[0]},{crop[1]} gives {logits_size(crop[0])}x{logits_size(crop[1])}; use a crop "
                            "of at least 501,501 (the original 512,512 gives 65x65) or --adv False")


def build_student(args, device):
    """Student: ImageNet backbone init (§A.3), optional ``--S_resume`` (raw state_dict or {'state_dict', 'step'})."""
    pretrained = None
    if args.is_student_load_imgnet:
        pretrained = args.student_pretrain_model_imgnet
        if not Path(pretrained).is_file():
            raise UserError(f"ImageNet weights of the student not found at {pretrained}; {IMAGENET_HINT}")
    student = build_model(STUDENT, num_classes=args.num_classes, norm=args.norm, pretrained_backbone=pretrained)
    if args.S_resume:
        state = load_checkpoint(args.S_ckpt_path, "student checkpoint (--S_ckpt_path)")
        load_state_dict_strict(student, state, f"student checkpoint {args.S_ckpt_path}")
        if "step" in state and args.resume is None:
            args.last_step = int(state["step"])
    return student.to(device)


def build_teacher(args, device):
    """Teacher: strict load of IFVD-named keys (§A.3); a missing file is an error (§A.9 item 8)."""
    teacher = build_model(args.teacher_model, num_classes=args.num_classes, norm=args.norm)
    state = load_checkpoint(args.T_ckpt_path, "teacher checkpoint (--T_ckpt_path)", TEACHER_HINT)
    load_state_dict_strict(teacher, state, f"teacher checkpoint {args.T_ckpt_path}")
    return teacher.to(device)


def build_discriminator(args, device):
    """D on the 19-channel student/teacher logits (§A.3 "Discriminator"), optionally resumed."""
    disc = Discriminator(args.preprocess_GAN_mode, args.imsize_for_adv, args.adv_conv_dim, args.num_classes)
    if args.D_resume:
        load_state_dict_strict(disc, load_checkpoint(args.D_ckpt_path, "discriminator checkpoint (--D_ckpt_path)"),
                               f"discriminator checkpoint {args.D_ckpt_path}")
    return disc.to(device)


def build_step(args, student, teacher, disc, device):
    """``NetModel.optimize_parameters`` (§A.4.6): the weighted terms, SGD for G and Adam for D (§A.6)."""
    terms = []
    if args.kd:
        kd = PixelKL(temperature=1.0)
        terms.append(DistillTerm("kd", args.lambda_kd, lambda s, t, y: kd(s[0], t[0])))
    if args.ifv:
        ifv = IntraClassFeatureVariation(args.num_classes, ignore_index=255)
        terms.append(DistillTerm("ifv", args.lambda_ifv, lambda s, t, y: ifv(s[2], t[2], y)))
    g_opt = build_g_optimizer(student, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    d_opt = build_d_optimizer(disc, "adam", lr=args.lr_d, betas=(0.9, 0.99)) if disc is not None else None
    return DistillStep(student, teacher, task_loss=CriterionDSN(ignore_index=255, aux_weight=0.4), terms=terms,
                       g_optimizer=g_opt, g_base_lr=args.lr_g, device=device, discriminator=disc, d_optimizer=d_opt,
                       d_base_lr=args.lr_d, adv_type=args.adv_loss_type, lambda_adv=args.lambda_adv,
                       lambda_d=args.lambda_d, lambda_gp=args.lambda_gp, amp=args.amp)


def average_gradients(optimizer):
    """Under torchrun, average the gradients of ``optimizer``'s parameters over ranks before its step."""
    import torch.distributed as dist

    def hook(opt, _args, _kwargs):
        world = dist.get_world_size()
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world

    optimizer.register_step_pre_hook(hook)


def method_name(args):
    """``results.json`` method: "ifvd" for the full objective, "baseline" for none, else e.g. "kd_ifv"."""
    parts = [name for name, on in (("kd", args.kd), ("ifv", args.ifv), ("adv", args.adv)) if on]
    return "ifvd" if len(parts) == 3 else "_".join(parts) or "baseline"


class OriginalLogLine(HookBase):
    """The original per-step line ``step G_lr G_loss(mc kd adv ifv) D_lr D_loss`` (§A.2.1 step 7.4) to the log file."""

    def __init__(self, logger, step):
        self.logger = logger
        self.step = step

    def after_step(self):
        t, losses = self.trainer, self.trainer.losses
        g_lr = self.step.g_optimizer.param_groups[0]["lr"]
        d_lr = self.step.d_optimizer.param_groups[0]["lr"] if self.step.d_optimizer is not None else 0.0
        self.logger.debug(
            f"step:{t.step:5d} G_lr:{g_lr:.6f} G_loss:{losses['loss_G']:.5f}(mc:{losses['mc']:.5f} "
            f"kd:{losses.get('kd', 0.0):.5f} adv:{losses.get('adv', 0.0):.5f} ifv:{losses.get('ifv', 0.0):.5f}) "
            f"D_lr:{d_lr:.6f} D_loss:{losses['loss_D']:.5f}")


def run_info(args):
    return {
        "paper": "ifvd", "method": method_name(args), "model": STUDENT, "dataset": "cityscapes", "split": "val",
        "iterations": args.num_steps, "crop": list(args.input_size), "batch": args.batch_size, "seed": args.seed,
        "teacher": args.teacher_model,
        "extra": {"run": args.save_name, "kd": args.kd, "ifv": args.ifv, "adv": args.adv,
                  "lambda_kd": args.lambda_kd, "lambda_ifv": args.lambda_ifv, "lambda_adv": args.lambda_adv,
                  "random_mirror": args.random_mirror, "random_scale": args.random_scale,
                  "teacher_ckpt": args.T_ckpt_path},
    }


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    seed_everything(args.seed)  # the original seeds 0 at import, before parsing (§A.2.1 step 1)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    check_args(args)
    apply_gpu(args.gpu)
    info = init_distributed(args.device)
    device = info.device
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {info.world_size} processes")
    run_dir = Path(args.save_dir) / args.save_name
    train_set = SeededDataset(CSTrainValSet(args.data_dir, resolve_list(args.data_list, "train", args.data_dir),
                                            max_iters=args.num_steps * args.batch_size, crop_size=args.input_size,
                                            scale=args.random_scale, mirror=args.random_mirror), args.seed)
    val_set = CSTrainValSet(args.data_dir, resolve_list(args.data_listval, "val", args.data_dir), crop_size=None)
    student = build_student(args, device)
    teacher = build_teacher(args, device)
    disc = build_discriminator(args, device) if args.adv else None
    step = build_step(args, student, teacher, disc, device)
    if info.world_size > 1:
        for optimizer in (step.g_optimizer, step.d_optimizer):
            if optimizer is not None:
                average_gradients(optimizer)
    start_step = args.last_step
    if args.resume:
        start_step = load_training_state(args.resume, step.state_models(), step.state_optimizers())["step"]
    logger = RunLogger(run_dir, "ifvd.train", enabled=info.is_main, start_step=start_step)
    for key, value in sorted(vars(args).items()):
        logger.debug(f"{key} : {value}")
    if args.resume:
        logger.info(f"resumed from {args.resume} at step {start_step}")

    batch = args.batch_size // info.world_size
    sampler = ResumableSampler(len(train_set), args.seed, start=start_step * batch, rank=info.rank,
                               world_size=info.world_size)
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=False, worker_init_fn=worker_init_fn,
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG resumable
    if info.world_size > 1:
        val_set = Subset(val_set, range(info.rank, len(val_set), info.world_size))
    vloader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=0)
    logger.info(f"{len(train_set)} train and {len(val_set)} val images are loaded")
    fields0 = run_info(args)
    if info.is_main:
        (run_dir / "args.json").write_text(json.dumps({**vars(args), "run_info": fields0}, indent=2) + "\n")
    state_path = run_dir / "training_state.pth"
    started = time.perf_counter()

    def save_state(n):
        if info.is_main:
            save_training_state(state_path, step=n, models=step.state_models(), optimizers=step.state_optimizers(),
                                extra={"run": args.save_name})

    def save_and_evaluate(n):
        """Save point (§A.2.1 step 7.5): G (+ D) state_dicts, then the val evaluation of the student."""
        prefix = run_dir / f"{args.data_set}_{n - 1}"
        if info.is_main:
            atomic_save(student.state_dict(), f"{prefix}_G.pth")
            if disc is not None:
                atomic_save(disc.state_dict(), f"{prefix}_D.pth")
        save_state(n)
        result = evaluate_main(student, vloader, num_classes=args.num_classes, device=device, whole=True,
                               output_dir=args.outputs_dir or None, progress=info.is_main)
        logger.info(f"mean_IU: {result.miou:.6f}  IU_array: {result.iou.tolist()}")
        if info.is_main:
            fields = {**fields0, **result.result_fields(), "iterations": n}
            fields["extra"] = {**fields["extra"], "train_wall_time_s": time.perf_counter() - started}
            write_results_json(run_dir / "results.json", **fields)
        barrier()

    class StateEvery(HookBase):
        def after_step(self):
            n = self.trainer.step + 1
            if args.state_every and n % args.state_every == 0 and n != self.trainer.max_steps:
                save_state(n)

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power, first_index=0),
             OriginalLogLine(logger, step),
             Logging(logger, device=device, period=20, progress=info.is_main),
             StateEvery(),
             PeriodicCheckpoint(save_and_evaluate, every=args.save_ckpt_every, start=args.save_ckpt_start, final=True)]
    Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks).train()
    logger.close()


if __name__ == "__main__":
    main()
