"""AICSD ICS loss benchmark (ratio measured in the same run; nothing asserted).

Forward + backward of the code-faithful inter-class similarity loss (specs/aicsd.md §4.3.2) on student
logits that require grad and fixed teacher logits: the closed form of
:class:`common.losses.aicsd.InterClassSimilarity` against the original's per-pair loop (transcribed below:
231 class pairs × 2 networks = 462 ``KLDivLoss`` calls). VOC shapes scaled down with the ratios kept:
batch 6, 21 classes, a square map of side ``--side`` (default 65 = 512 / 8 + 1; ``--side 129`` is 1/4,
``--side 513`` the real size: the loop then takes minutes per call). The two run interleaved
(bench/timing.py); the speed-up is the median of the per-round ratios loop / closed form, with its
spread. The values and gradients of the two are compared too.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from bench import timing
from common.losses.aicsd import InterClassSimilarity

BATCH, CLASSES, SIDE, ROUNDS = 6, 21, 65, 5


def ics_pair_loop(s_out, t_out, num_classes=CLASSES, temperature=1.0):
    """``distiller.py``'s lo_loss branch (§4.3.2) without λ and ``.cuda()``: the double loop over class pairs."""
    b = s_out.shape[0]
    s_logit = F.softmax(s_out / temperature, dim=2)
    t_logit = F.softmax(t_out / temperature, dim=2)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    iccs = torch.empty((num_classes, num_classes))
    icct = torch.empty((num_classes, num_classes))
    for i in range(num_classes):
        for j in range(i, num_classes):
            iccs[j, i] = iccs[i, j] = kl(s_logit[:, i], s_logit[:, j])
            icct[j, i] = icct[i, j] = kl(t_logit[:, i], t_logit[:, j])
    iccs = F.normalize(iccs, dim=1)
    icct = F.normalize(icct, dim=1)
    return (iccs - icct).pow(2).mean() / b


def fwd_bwd(loss_fn, logits_s, logits_t, out):
    """One forward + backward; keeps the last loss and gradient in ``out``."""
    logits_s.grad = None
    loss = loss_fn(logits_s, logits_t)
    loss.backward()
    out["loss"], out["grad"] = loss.detach(), logits_s.grad.clone()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench aicsd_ics", description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=SIDE, help=f"height = width of the logits (default {SIDE})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine one thread keeps CPU time comparable)")
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, CLASSES, args.side, args.side)
    # correlated student / teacher logits with some spatial structure, like two networks on one image
    base = 4 * F.interpolate(torch.randn(BATCH, CLASSES, 9, 9, generator=g), size=shape[2:], mode="bilinear",
                             align_corners=True)
    logits_s = (base + torch.randn(shape, generator=g)).requires_grad_(True)
    logits_t = base + torch.randn(shape, generator=g)
    closed_form = InterClassSimilarity(CLASSES)
    results = {"closed_form": {}, "loop": {}}
    samples = timing.interleave({
        "closed_form": lambda: fwd_bwd(closed_form, logits_s, logits_t, results["closed_form"]),
        "loop": lambda: fwd_bwd(ics_pair_loop, logits_s, logits_t, results["loop"]),
    }, rounds=args.rounds, warmup=1)
    loss_a, loss_b = results["closed_form"]["loss"], results["loop"]["loss"]
    grad_diff = (results["closed_form"]["grad"] - results["loop"]["grad"]).abs().max().item()
    grad_scale = results["loop"]["grad"].abs().max().item()
    speedup = timing.ratio(samples, "loop", "closed_form")
    print(f"ICS loss fwd+bwd, logits {'x'.join(map(str, shape))} float32 (VOC 6x21x513x513 scaled, ratios kept), "
          f"CPU {torch.get_num_threads()} threads; {timing.machine_note()}")
    for name, label in (("closed_form", "closed form"), ("loop", "per-pair loop (462 KLDivLoss calls)")):
        print(f"  {label}: median {samples[name].median_wall() * 1e3:.1f} ms wall, "
              f"{samples[name].median_cpu() * 1e3:.1f} ms CPU")
    print(f"  {speedup.text('speed-up loop / closed form')} (target >= 10x)")
    print(f"  values: closed form {loss_a.item():.6e}, loop {loss_b.item():.6e}, relative difference "
          f"{abs(loss_a - loss_b).item() / abs(loss_b).item():.1e}; max |grad difference| {grad_diff:.1e} "
          f"(max |grad| {grad_scale:.1e})")
    return {"speedup": speedup.wall.median, "shape": shape}


if __name__ == "__main__":
    main(sys.argv[1:])
