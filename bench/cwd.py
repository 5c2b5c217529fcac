"""Cost that CWD distillation adds to a training step (``make bench``; CPU, demo-size inputs).

ratio = time of one CWD step / time of the same step's unavoidable work, both measured in this
process with the same models and batch and both built by ``cwd/train.py``'s own ``build_step``: the
unavoidable work is that step with every term off (``--kd False --cwd False --adv False``: teacher
forward in eval mode under no_grad + student forward/backward with the task loss CE + 0.4·aux + the SGD
step); the CWD step adds λ·CWD(channel, kl, τ=4) on the logits (the README command). The feature
variant (``--cwd-feat True``: 128→512 adapter, CWD on the PSP features) is reported too. The three steps
run interleaved in rotating order (bench/timing.py); each ratio is the median of the per-round ratios,
with its spread, or "not resolved at this size" when the spread is larger than the effect. A CWD step
does all of the baseline's work, so a ratio below 1.0 is reported as not resolved.
"""
import argparse

import torch

from bench import timing
from common.models import build_model
from cwd.options import DEMO_BATCH, DEMO_CROP

ROUNDS = 10
README = ["--kd", "False", "--adv", "False", "--cwd", "True", "--norm-type", "channel", "--divergence", "kl",
          "--lambda-cwd", "3", "--temperature", "4"]
VARIANTS = {"baseline": ["--kd", "False", "--cwd", "False", "--adv", "False"],
            "cwd_logits": README + ["--cwd-feat", "False"],
            "cwd_feature": README + ["--cwd-feat", "True", "--lambda-cwd", "50"]}


def make_steps(student, teacher, device):
    from cwd.options import train_parser
    from cwd.train import build_step

    return {name: build_step(train_parser().parse_args(flags), student, teacher, device)
            for name, flags in VARIANTS.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench cwd", description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    h, w = (int(v) for v in DEMO_CROP.split(","))
    student, teacher = build_model("pspnet_resnet18"), build_model("pspnet_resnet101")
    batch = (torch.randn(DEMO_BATCH, 3, h, w), torch.randint(0, 19, (DEMO_BATCH, h, w)).float())
    steps = make_steps(student, teacher, torch.device("cpu"))
    samples = timing.interleave({name: (lambda s=step: s(batch, 0)) for name, step in steps.items()},
                                rounds=args.rounds, warmup=1)
    base = samples["baseline"]
    print(f"CWD distillation overhead (CPU, {torch.get_num_threads()} threads, batch {DEMO_BATCH}, crop {h}x{w}; "
          f"{timing.machine_note()})")
    print(f"  unavoidable step (teacher fwd + student fwd/bwd + task loss + SGD): median "
          f"{base.median_wall() * 1e3:.0f} ms wall, {base.median_cpu() * 1e3:.0f} ms CPU")
    results = {}
    for name in ("cwd_logits", "cwd_feature"):
        results[name] = timing.ratio(samples, name, "baseline")
        target = " (target <= 1.05)" if name == "cwd_logits" else ""
        print(f"  {results[name].text(f'{name} / baseline', floor=1.0)}{target}")
    return results


if __name__ == "__main__":
    main()
