"""SKD journal code ``train_and_eval.py`` (specs/ifvd_skd.md §B.2.2, §B.4.5, §B.6): structured knowledge
distillation of PSPNet-R101 into PSPNet-R18 on Cityscapes, with evaluation near the end.

Student loss ``CE + 0.4·CE_aux [+ λ_pi·pixel-wise] [+ λ_pa·pair-wise(psp_feat, pool 0.5)]
[+ λ_d·(−mean D(z_S))]``, then one WGAN-GP discriminator step (SGD, G's momentum and weight decay) per G
step (common/engine/distill.py). Poly LR with it = 1..num_steps; the run stops after step num_steps (the
original went on to step 40 001 and crashed on a complex learning rate, §B.9 item 1). Evaluation and the
student snapshot ``CS_scenes_<step>_<mIoU>.pth`` at the original steps (39 326, 39 697, 39 999 by default).
"""
import json
import os
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
from common.losses.segmentation import CriterionDSN
from common.losses.skd import PairWise, PixelWise
from common.models import Discriminator, build_model
from common.models.weights import load_checkpoint, load_state_dict_strict, remap_toolbox_teacher
from skd.options import SAVE_PATH, STUDENT, resolve_list, train_parser

CITYSCAPES_TRAIN_IMAGES = 2975  # the original's save_steps = int(2975 / batch_size) (§B.2.2 step 4)
TEACHER_HINT = ("download the SKD teacher (skd/README.md, journal code line) to "
                "./ckpt/Teacher/CS_scenes_38413_0.7832174615268139.pth or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("pass --student-pretrain-model-imgnet ./dataset/resnet18-imagenet.pth (as run_train_val.sh does) "
                 "or train from scratch with --is-student-load-imgnet False")


def logits_size(n):
    """Side of the stride-8 map for an input side ``n`` (deep stem, ceil-mode max-pool; 512 -> 65)."""
    n = (n - 1) // 2 + 1
    n = -(-(n - 1) // 2) + 1
    return (n - 1) // 2 + 1


def check_args(args):
    """Reject flag values the original crashed on, with the fix."""
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} is too small: batch-norm in training needs at least 2 images")
    if args.num_steps <= 0 or not 0 <= args.last_step < args.num_steps:
        raise UserError(f"--num-steps {args.num_steps} / --last-step {args.last_step}: need 0 <= last-step < num-steps")
    if args.classes_num < 1:
        raise UserError(f"--classes_num must be positive, got {args.classes_num}")
    if args.save_steps is not None and args.save_steps <= 0:
        raise UserError(f"--save-steps must be positive, got {args.save_steps}")
    if args.pa and not 0 < args.pool_scale <= 1:
        raise UserError(f"--pool-scale must be in (0, 1], got {args.pool_scale}")
    if args.pa and min(int(logits_size(c) * args.pool_scale) for c in args.input_size) < 1:
        raise UserError(f"--pool-scale {args.pool_scale} gives an empty pooling patch for the "
                        f"{logits_size(args.input_size[0])}x{logits_size(args.input_size[1])} features of "
                        f"--input-size {args.input_size[0]},{args.input_size[1]}; use a larger crop or scale")
    if args.ho:
        check_adv_type(args.adv_loss_type)
        if args.imsize_for_adv != 65:
            raise UserError(f"--imsize-for-adv must be 65 (the discriminator has no layer l4 otherwise), "
                            f"got {args.imsize_for_adv}")
        if args.preprocess_GAN_mode not in (1, 2, 3):
            raise UserError(f"--preprocess-GAN-mode must be 1, 2 or 3, got {args.preprocess_GAN_mode}")
        crop = args.input_size
        if min(logits_size(c) for c in crop) < 64:
            raise UserError(f"--ho needs logits of at least 64x64 for the discriminator, but --input-size "
                            f"{crop[0]},{crop[1]} gives {logits_size(crop[0])}x{logits_size(crop[1])}; use a crop "
                            "of at least 501,501 (the original 512,512 gives 65x65) or --ho False")


def override_paths(args):
    """The original's post-parse overrides (§B.2.2 step 1): student and D resume folders."""
    args.S_ckpt_path = f"./ckpt/{SAVE_PATH}/Student"
    args.D_ckpt_path = f"./ckpt/{SAVE_PATH}/Distriminator"
    args.gpu_num = len(args.gpu.split(","))


def build_student(args, device, notes):
    """``load_S_model`` (§B.3): ImageNet backbone, else an optional ``model_best.pth.tar`` resume."""
    student = build_model(STUDENT, num_classes=args.classes_num, norm=args.norm, return_features=True)
    if args.is_student_load_imgnet:
        path = args.student_pretrain_model_imgnet
        if path in ("None", "") or not Path(path).is_file():
            raise UserError(f"ImageNet weights of the student not found at {path!r}; {IMAGENET_HINT}")
        from common.models.weights import load_imagenet_backbone

        load_imagenet_backbone(student, path)
        notes.append(f"student backbone initialised from {path}")
    elif args.S_resume:
        path = Path(args.S_ckpt_path) / "model_best.pth.tar"
        if path.is_file():
            state = load_checkpoint(str(path), "student checkpoint (model_best.pth.tar)")
            load_state_dict_strict(student, state, f"student checkpoint {path}")
            if "step" in state and args.resume is None:
                args.last_step = int(state["step"])
            notes.append(f"student resumed from {path}")
        else:
            notes.append(f"no student checkpoint at {path}: the student starts from random initialisation")
    return student.to(device)


def build_teacher(args, device):
    """``load_T_model`` (§B.3): toolbox keys remapped (head.0 -> pspmodule, head.1 -> head), then a strict load."""
    teacher = build_model(args.teacher_model, num_classes=args.classes_num, norm=args.norm, return_features=True)
    state = load_checkpoint(args.T_ckpt_path, "teacher checkpoint (--T_ckpt_path)", TEACHER_HINT)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    load_state_dict_strict(teacher, remap_toolbox_teacher(state), f"teacher checkpoint {args.T_ckpt_path}")
    return teacher.to(device)


def build_discriminator(args, device, notes):
    """D on the 19-channel logits (§B.3, §C.3); an optional ``model_best.pth.tar`` in the D folder."""
    disc = Discriminator(args.preprocess_GAN_mode, args.imsize_for_adv, args.adv_conv_dim, args.classes_num)
    path = Path(args.D_ckpt_path) / "model_best.pth.tar"
    if args.D_resume and path.is_file():
        load_state_dict_strict(disc, load_checkpoint(str(path), "discriminator checkpoint (model_best.pth.tar)"),
                               f"discriminator checkpoint {path}")
        notes.append(f"discriminator resumed from {path}")
    return disc.to(device)


def build_step(args, student, teacher, disc, device):
    """``NetModel.optimize_parameters`` (§B.4.5): weighted terms, SGD for G and for D (§B.6)."""
    terms = []
    if args.pi:
        pixel_wise = PixelWise()
        terms.append(DistillTerm("pixelwise", args.lambda_pi, lambda s, t, y: pixel_wise(s[0], t[0])))
    if args.pa:
        pair_wise = PairWise(scale=args.pool_scale)
        # feat_ind = -5 of the 7 outputs [logits, dsn, psp_feat, x4, x3, x2, x1] is psp_feat (§B.3)
        terms.append(DistillTerm("pairwise", args.lambda_pa, lambda s, t, y: pair_wise(s[-5], t[-5])))
    g_opt = build_g_optimizer(student, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    d_opt = None
    if disc is not None:
        d_opt = build_d_optimizer(disc, "sgd", lr=args.lr_d, momentum=args.momentum, weight_decay=args.weight_decay)
    return DistillStep(student, teacher, task_loss=CriterionDSN(ignore_index=255, aux_weight=0.4), terms=terms,
                       g_optimizer=g_opt, g_base_lr=args.lr_g, device=device, discriminator=disc, d_optimizer=d_opt,
                       d_base_lr=args.lr_d, adv_type=args.adv_loss_type, lambda_adv=args.lambda_d,
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


def is_eval_step(step, num_steps, save_steps):
    """The original rule on the 1-based step (§B.2.2 step 7): 39 326, 39 697 and 39 999 by default."""
    return (step > 1 and step % save_steps == 0 and step > num_steps - 1000) or step == num_steps - 1


def method_name(args):
    """``results.json`` method as in the reported tables: "pi", "pi_pa", "pi_pa_ho", ... or "baseline"."""
    parts = [name for name, on in (("pi", args.pi), ("pa", args.pa), ("ho", args.ho)) if on]
    return "_".join(parts) or "baseline"


class OriginalLogLine(HookBase):
    """The original line ``step G_lr G_loss(mc pixelwise pairwise) D_lr D_loss``, 1-based step (§B.2.2 step 6.4)."""

    def __init__(self, logger, step):
        self.logger = logger
        self.step = step

    def after_step(self):
        t, losses = self.trainer, self.trainer.losses
        g_lr = self.step.g_optimizer.param_groups[0]["lr"]
        d_lr = self.step.d_optimizer.param_groups[0]["lr"] if self.step.d_optimizer is not None else 0.0
        self.logger.debug(
            f"step:{t.step + 1} G_lr:{g_lr:.6f} G_loss:{losses['loss_G']:.5f}(mc:{losses['mc']:.5f} "
            f"pixelwise:{losses.get('pixelwise', 0.0):.5f} pairwise:{losses.get('pairwise', 0.0):.5f}) "
            f"D_lr:{d_lr:.6f} D_loss:{losses['loss_D']:.5f}")


def run_info(args):
    return {
        "paper": "skd", "method": method_name(args), "model": STUDENT, "dataset": "cityscapes", "split": "val",
        "iterations": args.num_steps, "crop": list(args.input_size), "batch": args.batch_size, "seed": args.seed,
        "teacher": args.teacher_model,
        "extra": {"code": "journal", "pi": args.pi, "pa": args.pa, "ho": args.ho, "lambda_pi": args.lambda_pi,
                  "lambda_pa": args.lambda_pa, "lambda_d": args.lambda_d, "pool_scale": args.pool_scale,
                  "random_mirror": args.random_mirror, "random_scale": args.random_scale,
                  "teacher_ckpt": args.T_ckpt_path},
    }


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    override_paths(args)
    check_args(args)
    info = init_distributed(args.device)
    device = info.device
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {info.world_size} processes")
    if args.seed is not None:
        seed_everything(args.seed)
    data_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    save_steps = args.save_steps or int(CITYSCAPES_TRAIN_IMAGES / args.batch_size)
    log_dir, snapshot_dir = Path(args.log_dir), Path(args.snapshot_dir)

    train_set = CSTrainValSet(args.data_dir, resolve_list(args.data_list, "train", args.data_dir),
                              max_iters=args.num_steps * args.batch_size, crop_size=args.input_size,
                              scale=args.random_scale, mirror=args.random_mirror, truncate=False)
    val_set = CSTrainValSet(args.data_dir, resolve_list(args.data_listval, "val", args.data_dir), crop_size=None)
    notes = []
    student = build_student(args, device, notes)
    teacher = build_teacher(args, device)
    disc = build_discriminator(args, device, notes) if args.ho else None
    step = build_step(args, student, teacher, disc, device)
    if info.world_size > 1:
        for optimizer in (step.g_optimizer, step.d_optimizer):
            if optimizer is not None:
                average_gradients(optimizer)
    start_step = args.last_step
    if args.resume:
        resumed = load_training_state(args.resume, step.state_models(), step.state_optimizers())
        start_step = resumed["step"]
        data_seed = int(resumed["extra"].get("data_seed", data_seed))
        notes.append(f"resumed from {args.resume} at step {start_step + 1}")
    logger = RunLogger(log_dir, "skd.train", enabled=info.is_main, start_step=start_step)
    for key, value in sorted(vars(args).items()):
        logger.debug(f"{key} : {value}")
    for note in notes:
        logger.info(note)

    batch = args.batch_size // info.world_size
    dataset = SeededDataset(train_set, data_seed)
    sampler = ResumableSampler(len(dataset), data_seed, start=start_step * batch, rank=info.rank,
                               world_size=info.world_size)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=False, worker_init_fn=worker_init_fn,
                        generator=torch.Generator().manual_seed(data_seed))  # keeps the global RNG resumable
    if info.world_size > 1:
        val_set = Subset(val_set, range(info.rank, len(val_set), info.world_size))
    vloader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=0)
    logger.info(f"{len(train_set)} train and {len(val_set)} val images are loaded; data seed {data_seed}")
    fields0 = run_info(args)
    if info.is_main:
        (log_dir / "args.json").write_text(json.dumps({**vars(args), "run_info": fields0}, indent=2) + "\n")
    state_path = log_dir / "training_state.pth"
    started = time.perf_counter()

    def save_state(n):
        if info.is_main:
            save_training_state(state_path, step=n, models=step.state_models(), optimizers=step.state_optimizers(),
                                extra={"data_seed": data_seed})

    def evaluate_and_save(n):
        """Evaluation point (§B.2.2 step 7): val mIoU, then ``CS_scenes_<step>_<mIoU>.pth`` (the student only)."""
        result = evaluate_main(student, vloader, num_classes=args.classes_num, device=device, whole=True,
                               output_dir=args.outputs_dir or None, progress=info.is_main)
        logger.info(f"[val 512,512] mean_IU:{result.miou!r}  IU_array:{result.iou.tolist()}")
        if info.is_main:
            path = snapshot_dir / f"CS_scenes_{n}_{float(result.miou)!r}.pth"
            atomic_save(student.state_dict(), path)
            fields = {**fields0, **result.result_fields(), "iterations": n}
            fields["extra"] = {**fields["extra"], "checkpoint": path.name,
                               "train_wall_time_s": time.perf_counter() - started}
            write_results_json(snapshot_dir / "results.json", **fields)
        save_state(n)
        barrier()

    class StateEvery(HookBase):
        def after_step(self):
            n = self.trainer.step + 1
            if args.state_every and n % args.state_every == 0 and not is_eval_step(n, args.num_steps, save_steps):
                save_state(n)

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power, first_index=1),
             OriginalLogLine(logger, step),
             Logging(logger, device=device, period=20, progress=info.is_main),
             StateEvery(),
             PeriodicCheckpoint(evaluate_and_save, final=False,
                                when=lambda n: is_eval_step(n, args.num_steps, save_steps))]
    Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks).train()
    logger.info(f"stopped after step {args.num_steps} (the original crashed at step {args.num_steps + 1})")
    logger.close()


if __name__ == "__main__":
    main()
