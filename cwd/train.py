"""CWD ``train.py`` (specs/cwd.md §3.2): distil PSPNet-R101 into PSPNet-R18 on Cityscapes.

Loss of the student: CE + 0.4·CE_aux [+ λ_kd·pixel KD] [+ λ_adv·(−mean D(z_S))] [+ λ_cwd·CWD], with
CWD on the logits or (``--cwd-feat``) on the PSP features through the 128→512 adapter; one D step per
G step with ``--adv`` (common/engine/distill.py). Poly LR on param group 0 of G and D. At every save
point (by default only the last step) the student (``<data_set>_<step>_G.pth``, + ``_D.pth``) is
saved and evaluated on val; the mIoU goes to the log and to ``<run>/results.json``.
"""
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    loader_generator,
    save_training_state,
    seed_everything,
    worker_init_fn,
)
from common.engine.dist import destroy
from common.engine.distill import DistillStep, DistillTerm, build_d_optimizer, build_g_optimizer
from common.errors import UserError, main_guard
from common.evaluation import evaluate_main, write_results_json
from common.losses.cwd import ChannelWiseDivergence, FeatureAdapter
from common.losses.kd import PixelKL
from common.losses.segmentation import CriterionDSN
from common.models import Discriminator, build_model
from common.models.weights import load_checkpoint, load_state_dict_strict
from cwd.options import parse_input_size, resolve_list, train_parser

STUDENT, TEACHER = "pspnet_resnet18", "pspnet_resnet101"
TEACHER_HINT = ("download teacher_city.pth (README: Quick start) into ./ckpt/ or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("download resnet18-imagenet.pth (README: Quick start) into ./ckpt/, pass "
                 "--student-pretrain-model-imgnet, or train from scratch with --is-student-load-imgnet False")


def logits_size(n):
    """Side of the stride-8 map for an input side ``n`` (deep stem, ceil-mode max-pool; 512 -> 65)."""
    n = (n - 1) // 2 + 1
    n = -(-(n - 1) // 2) + 1
    return (n - 1) // 2 + 1


def check_args(args):
    crop = parse_input_size(args.input_size)
    if args.cwd:
        ChannelWiseDivergence(args.norm_type, args.divergence, args.temperature)
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} is too small: batch-norm in train mode needs 2 images or more")
    if args.num_steps <= 0 or not 0 <= args.last_step <= args.num_steps:
        raise UserError(f"--num-steps {args.num_steps} / --last-step {args.last_step}: "
                        "need 0 <= last-step <= num-steps")
    if args.adv:
        if args.imsize_for_adv != 65:
            raise UserError(f"--imsize-for-adv must be 65 (the discriminator has no layer l4 otherwise), "
                            f"got {args.imsize_for_adv}")
        if args.preprocess_GAN_mode not in (1, 2, 3):
            raise UserError(f"--preprocess-GAN-mode must be 1, 2 or 3, got {args.preprocess_GAN_mode}")
        if min(logits_size(c) for c in crop) < 64:
            least = next(c for c in range(8, 1024) if logits_size(c) >= 64)
            raise UserError(f"--adv needs logits of at least 64x64 for the discriminator, but --input-size "
                            f"{args.input_size} gives {logits_size(crop[0])}x{logits_size(crop[1])}; use a crop of "
                            f"at least {least},{least} (the original 512,512 gives 65x65)")
    return crop


def build_student(args, device):
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
    teacher = build_model(TEACHER, num_classes=args.num_classes, norm=args.norm)
    state = load_checkpoint(args.T_ckpt_path, "teacher checkpoint (--T_ckpt_path)", TEACHER_HINT)
    load_state_dict_strict(teacher, state, f"teacher checkpoint {args.T_ckpt_path}")
    return teacher.to(device)


def build_terms(args, device):
    """The distillation terms of ``NetModel`` in its order (kd, cwd) and the adapter, if any."""
    terms, extra = [], []
    if args.kd:
        kd = PixelKL()
        terms.append(DistillTerm("kd", args.lambda_kd, lambda s, t, y: kd(s[0], t[0])))
    if args.cwd:
        cwd = ChannelWiseDivergence(args.norm_type, args.divergence, args.temperature)
        if args.cwd_feat:
            adapter = FeatureAdapter(128, 512, norm=args.norm).to(device)
            extra.append(adapter)
            terms.append(DistillTerm("cwd", args.lambda_cwd, lambda s, t, y: cwd(adapter(s[2]), t[2])))
        else:
            terms.append(DistillTerm("cwd", args.lambda_cwd, lambda s, t, y: cwd(s[0], t[0])))
    return terms, extra


def method_name(args):
    parts = ["cwd"] if args.cwd else []
    parts += [name for name, on in (("kd", args.kd), ("adv", args.adv)) if on]
    return "+".join(parts) or "baseline"


class OriginalLogLine(HookBase):
    """The original per-step line (§3.2 e) into the log file; G_lr is read from the last param group."""

    def __init__(self, logger, step):
        self.logger = logger
        self.step = step

    def after_step(self):
        t, losses = self.trainer, self.trainer.losses
        g_lr = self.step.g_optimizer.param_groups[-1]["lr"]
        d_lr = self.step.d_optimizer.param_groups[-1]["lr"] if self.step.d_optimizer is not None else 0.0
        self.logger.debug(
            f"step:{t.step:5d} G_lr:{g_lr:.6f} G_loss:{losses['loss_G']:.5f}(mc:{losses['mc']:.5f} "
            f"kd:{losses.get('kd', 0.0):.5f} adv:{losses.get('adv', 0.0):.5f} cwd:{losses.get('cwd', 0.0):.5f}) "
            f"D_lr:{d_lr:.6f} D_loss:{losses['loss_D']:.5f}")


def val_loader(args, info):
    dataset = CSTrainValSet(args.data_dir, resolve_list(args.data_listval, "val", args.data_dir), crop_size=None)
    if info.world_size > 1:
        dataset = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)


def run_info(args, crop):
    return {
        "paper": "cwd", "method": method_name(args), "model": STUDENT, "dataset": "cityscapes", "split": "val",
        "iterations": args.num_steps, "crop": list(crop), "batch": args.batch_size, "seed": args.seed,
        "teacher": TEACHER,
        "extra": {"level": "feature" if args.cwd_feat else "logits", "run": args.save_name,
                  "norm_type": args.norm_type, "divergence": args.divergence, "lambda_cwd": args.lambda_cwd,
                  "temperature": args.temperature, "kd": args.kd, "adv": args.adv, "cwd": args.cwd,
                  "teacher_ckpt": args.T_ckpt_path},
    }


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    crop = check_args(args)
    info = init_distributed(args.device)
    device = info.device
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {info.world_size} processes")
    seed_everything(args.seed)
    run_dir = Path(args.save_dir) / args.save_name
    student = build_student(args, device)
    teacher = build_teacher(args, device)
    terms, extra = build_terms(args, device)
    g_opt = build_g_optimizer(student, extra, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    disc = d_opt = None
    if args.adv:
        disc = Discriminator(args.preprocess_GAN_mode, args.imsize_for_adv, args.adv_conv_dim, args.num_classes)
        disc = disc.to(device)
        if args.D_resume:
            load_state_dict_strict(disc, load_checkpoint(args.D_ckpt_path, "discriminator checkpoint (--D_ckpt_path)"),
                                   f"discriminator checkpoint {args.D_ckpt_path}")
        d_opt = build_d_optimizer(disc, "adam", lr=args.lr_d, betas=(0.9, 0.99))
    step = DistillStep(student, teacher, task_loss=CriterionDSN(aux_weight=0.4), terms=terms, g_optimizer=g_opt,
                       g_base_lr=args.lr_g, device=device, extra_modules=extra, discriminator=disc,
                       d_optimizer=d_opt, d_base_lr=args.lr_d, adv_type=args.adv_loss_type,
                       lambda_adv=args.lambda_adv, lambda_d=args.lambda_d, lambda_gp=args.lambda_gp, amp=args.amp)
    state_path = run_dir / "training_state.pth"
    start_step = args.last_step
    if args.resume:
        start_step = load_training_state(args.resume, step.state_models(), step.state_optimizers())["step"]
    logger = RunLogger(run_dir, "cwd.train", enabled=info.is_main, start_step=start_step)
    for key, value in sorted(vars(args).items()):
        logger.debug(f"{key} : {value}")
    if args.resume:
        logger.info(f"resumed from {args.resume} at step {start_step}")

    batch = args.batch_size // info.world_size
    train_set = SeededDataset(CSTrainValSet(args.data_dir, resolve_list(args.data_list, "train", args.data_dir),
                                            max_iters=args.num_steps * args.batch_size, crop_size=crop,
                                            scale=args.random_scale, mirror=args.random_mirror), args.seed)
    sampler = ResumableSampler(len(train_set), args.seed, start=start_step * batch, rank=info.rank,
                               world_size=info.world_size)
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=False, worker_init_fn=worker_init_fn,
                        generator=loader_generator(args.seed))
    logger.info(f"{len(train_set)} images are loaded!")
    vloader = val_loader(args, info)
    logger.info(f"{len(getattr(vloader.dataset, 'dataset', vloader.dataset))} images are loaded!")
    info_fields = run_info(args, crop)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps({**vars(args), "run_info": info_fields}, indent=2) + "\n")
    started = time.perf_counter()

    def save_state(n):
        if info.is_main:
            save_training_state(state_path, step=n, models=step.state_models(), optimizers=step.state_optimizers(),
                                extra={"run": args.save_name})

    def save_and_evaluate(n):
        """Original save point: G (+ D) state_dicts, then the val evaluation of the student."""
        prefix = run_dir / f"{args.data_set}_{n - 1}"
        if info.is_main:
            atomic_save(student.state_dict(), f"{prefix}_G.pth")
            if disc is not None:
                atomic_save(disc.state_dict(), f"{prefix}_D.pth")
        save_state(n)
        result = evaluate_main(student, vloader, num_classes=args.num_classes, device=device, whole=True,
                               output_dir=args.outputs_dir if info.is_main else None, progress=info.is_main)
        logger.info(f"mean_IU: {result.miou:.6f}  IU_array: {result.iou.tolist()}")
        if info.is_main:
            fields = {**info_fields, **result.result_fields(), "iterations": n}
            fields["extra"] = {**fields["extra"], "train_wall_time_s": time.perf_counter() - started}
            write_results_json(run_dir / "results.json", **fields)
        barrier()

    class StateEvery(HookBase):
        def after_step(self):
            n = self.trainer.step + 1
            if args.state_every and n % args.state_every == 0 and n != self.trainer.max_steps:
                save_state(n)

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power),
             OriginalLogLine(logger, step),
             Logging(logger, device=device, period=20, progress=info.is_main),
             StateEvery(),
             PeriodicCheckpoint(save_and_evaluate, every=args.save_ckpt_every, start=args.save_ckpt_start, final=True)]
    Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks).train()
    logger.close()
    destroy()


if __name__ == "__main__":
    main()
