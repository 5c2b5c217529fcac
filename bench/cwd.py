"""Cost that CWD distillation adds to a training step (``make bench``; CPU, demo-size inputs).

ratio = time of one CWD step / time of the same step's unavoidable work, both measured in this
process with the same models and batch: the unavoidable work is the teacher forward (eval,
no_grad) + the student forward/backward with the task loss (CE + 0.4·aux) + the SGD step, i.e.
:class:`common.engine.distill.DistillStep` without distillation terms; the CWD step adds
λ·CWD(channel, kl, τ=4) on the logits (the README command). The feature variant (128→512 adapter,
CWD on the PSP features) is reported too. Steps alternate between the variants (in a rotating order) and the fastest
of the repeats is used (wall clock and process CPU time), so machine load affects all of them
alike and perturbs the minimum least.
"""
import time

import torch

from common.engine.distill import DistillStep, DistillTerm, build_g_optimizer
from common.losses.cwd import ChannelWiseDivergence, FeatureAdapter
from common.losses.segmentation import CriterionDSN
from common.models import build_model
from cwd.options import DEMO_BATCH, DEMO_CROP

WARMUP = 2
REPEATS = 12


def make_steps(student, teacher):
    cwd = ChannelWiseDivergence("channel", "kl", 4.0)
    adapter = FeatureAdapter(128, 512, norm="auto")
    common = dict(task_loss=CriterionDSN(), g_base_lr=0.01, device="cpu")
    return {
        "baseline": DistillStep(student, teacher, terms=[], g_optimizer=build_g_optimizer(student), **common),
        "cwd_logits": DistillStep(student, teacher, terms=[DistillTerm("cwd", 3.0, lambda s, t, y: cwd(s[0], t[0]))],
                                  g_optimizer=build_g_optimizer(student), **common),
        "cwd_feature": DistillStep(student, teacher,
                                   terms=[DistillTerm("cwd", 50.0, lambda s, t, y: cwd(adapter(s[2]), t[2]))],
                                   g_optimizer=build_g_optimizer(student, [adapter]), extra_modules=[adapter],
                                   **common),
    }


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    h, w = (int(v) for v in DEMO_CROP.split(","))
    student, teacher = build_model("pspnet_resnet18"), build_model("pspnet_resnet101")
    batch = (torch.randn(DEMO_BATCH, 3, h, w), torch.randint(0, 19, (DEMO_BATCH, h, w)).float())
    steps = make_steps(student, teacher)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    names = list(steps)
    for i in range(WARMUP + REPEATS):
        for name in names[i % 3:] + names[:i % 3]:
            step = steps[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            step(batch, i)
            if i >= WARMUP:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    base, base_cpu = min(wall["baseline"]), min(cpu["baseline"])
    print(f"CWD distillation overhead (CPU, {torch.get_num_threads()} threads, batch {DEMO_BATCH}, crop {h}x{w}, "
          f"fastest of {REPEATS})")
    print(f"  unavoidable step (teacher fwd + student fwd/bwd + task loss + SGD): {base * 1000:.0f} ms "
          f"(CPU time {base_cpu * 1000:.0f} ms)")
    for name in ("cwd_logits", "cwd_feature"):
        t, t_cpu = min(wall[name]), min(cpu[name])
        target = "   (target <= 1.05)" if name == "cwd_logits" else ""
        print(f"  {name:12s} {t * 1000:7.0f} ms   ratio {t / base:.3f}   CPU-time ratio {t_cpu / base_cpu:.3f}{target}")


if __name__ == "__main__":
    main()
