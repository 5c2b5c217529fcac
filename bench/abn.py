"""InPlace-ABN benchmark (specs/inplace_abn.md §7.4): the compiled layer against nn.BatchNorm2d + in-place
LeakyReLU, measured in the same run; prints ratios (< 1 = InPlace-ABN is faster / smaller) with their spread.

Time: forward+backward of the norm layer alone on the PSPNet-R101 shapes (batch 8, 512x512 crops, output
stride 8), each variant starting from a fresh copy of the input, the two variants interleaved round by round
(bench/timing.py). On the CPU the batch and the spatial sizes are scaled down (``--batch``, ``--spatial-div``)
with the channel counts and the spatial ratios kept. Memory on the CPU: peak RSS growth of one training step of
a 20-block conv3x3->norm->act stack, each variant in a fresh subprocess. With ``--device cuda`` the shapes are
the real ones (batch 8, 512x512), times are taken between ``torch.cuda.synchronize`` calls, and memory is
``torch.cuda.max_memory_allocated`` above the pre-step allocation for one training step of a 4-block
conv1x1->norm->act stack at each layer's shape.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import timing

# (name, channels, feature size at a 512x512 crop) for PSPNet-R101 (dilated ResNet, output stride 8).
BACKBONE = [("stem", 128, 256), ("layer1", 256, 128), ("layer2", 512, 64), ("layer3", 1024, 64),
            ("layer4", 2048, 64)]
HEAD = [("psp_bottleneck/dsn", 512, 64), ("psp_stage6", 512, 6), ("psp_stage3", 512, 3), ("psp_stage2", 512, 2),
        ("psp_stage1", 512, 1)]
ROUNDS = 15
SAMPLE_SECONDS = 0.02  # each timed sample repeats the call until it lasts about this long


def _scaled(size, spatial_div):
    return max(1, size // spatial_div) if size > 6 else size


def _repeated(fn, sync):
    """``fn`` repeated n times so one call lasts about SAMPLE_SECONDS; returns (block, n)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    n = max(1, math.ceil(SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-9)))

    def block():
        for _ in range(n):
            fn()
    return block, n


def layer_variants(batch, channels, size, device, dtype=torch.float32):
    """fwd+bwd of BatchNorm2d + in-place LeakyReLU and of InPlaceABN on one input, each from a fresh clone."""
    from common.abn import InPlaceABN

    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(batch, channels, size, size, dtype=dtype, device=device)
    bn = nn.BatchNorm2d(channels).to(device, dtype)
    iabn = InPlaceABN(channels).to(device, dtype)

    def native():
        y = F.leaky_relu(bn(x.clone()), 0.01, inplace=True)
        y.backward(g)

    def inplace():
        y = iabn(x.clone())
        y.backward(g)

    return {"bn": native, "iabn": inplace}


def time_layer(batch, channels, size, rounds, device):
    """Per-call seconds of both variants over interleaved rounds: {"bn": [...], "iabn": [...]}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fns = layer_variants(batch, channels, size, device)
    blocks = {}
    for name, fn in fns.items():
        block, n = _repeated(fn, sync)
        blocks[name] = (block, n)
    samples = timing.interleave({name: b for name, (b, _) in blocks.items()}, rounds=rounds, warmup=1, sync=sync)
    return {name: timing.Samples([t / blocks[name][1] for t in s.wall], [t / blocks[name][1] for t in s.cpu])
            for name, s in samples.items()}


def _stack(norm, channels, blocks, kernel):
    from common.abn import InPlaceABN

    layers = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False))
        if norm == "bn":
            layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True)]
        else:
            layers.append(InPlaceABN(channels))
    return nn.Sequential(*layers)


def memory_child(norm, batch, channels, size):
    """Runs in a fresh process: peak RSS growth (MiB) of one forward+backward of the 20-block stack."""
    torch.manual_seed(0)
    model = _stack(norm, channels, 20, 3)
    x = torch.randn(batch, channels, size, size)
    with open("/proc/self/statm") as f:
        before_kib = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    model(x).sum().backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak_kib - before_kib) / 1024}))


def _memory_cpu(norm, batch, channels, size):
    out = subprocess.run([sys.executable, "-m", "bench.abn", "--memory-child", norm, str(batch), str(channels),
                          str(size)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_cuda(norm, batch, channels, size, device):
    """MiB allocated at the peak of one fwd+bwd of a 4-block conv1x1->norm->act stack, above the pre-step level."""
    torch.manual_seed(0)
    model = _stack(norm, channels, 4, 1).to(device)
    x = torch.randn(batch, channels, size, size, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model(x).sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del model, x
    torch.cuda.empty_cache()
    return peak / 2 ** 20


def _part_ratio(per_layer):
    """Per-round ratio of the summed layer times (IABN / BN) of one part."""
    rounds = len(per_layer[0]["bn"].wall)
    total = {name: timing.Samples([sum(layer[name].wall[i] for layer in per_layer) for i in range(rounds)],
                                  [sum(layer[name].cpu[i] for layer in per_layer) for i in range(rounds)])
             for name in ("bn", "iabn")}
    return timing.ratio(total, "iabn", "bn")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench abn", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (scaled shapes) or cuda (batch 8, 512x512 shapes)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default: 2 on cpu, the recipe's 8 on cuda)")
    parser.add_argument("--spatial-div", type=int, default=None,
                        help="divide the 512x512-crop feature sizes by this (default: 4 on cpu, 1 on cuda)")
    timing.add_arguments(parser, rounds=ROUNDS)
    parser.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.memory_child:
        norm, batch, channels, size = args.memory_child
        return memory_child(norm, int(batch), int(channels), int(size))

    from common.abn import extension_available
    from common.abn._backend import BUILD_HINT

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench abn: --device cuda but no CUDA device is available")
        return 1
    if not extension_available():
        print(f"bench abn: the InPlace-ABN extension is not built; {BUILD_HINT}")
        return 1
    batch = args.batch or (8 if cuda else 2)
    spatial_div = args.spatial_div or (1 if cuda else 4)
    if cuda:
        where = f"CUDA {torch.cuda.get_device_name(device)}"
    else:
        torch.set_num_threads(2)
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"bench abn: {where}, float32; PSPNet-R101 shapes at batch 8 / 512x512"
          + ("" if (batch, spatial_div) == (8, 1) else f" scaled to batch {batch}, spatial / {spatial_div} "
             "(channels and spatial ratios kept)") + f"; {timing.machine_note()}")
    print(f"{'layer':<20} {'shape':<20} {'BN+LReLU ms':>12} {'IABN ms':>9}  IABN / BN per round")
    results = {}
    for part, layers in (("backbone", BACKBONE), ("head", HEAD)):
        per_layer = []
        for name, channels, size in layers:
            size = _scaled(size, spatial_div)
            times = time_layer(batch, channels, size, args.rounds, device)
            per_layer.append(times)
            shape = f"{batch}x{channels}x{size}x{size}"
            r = timing.ratio(times, "iabn", "bn")
            print(f"{name:<20} {shape:<20} {times['bn'].median_wall() * 1e3:>12.3f} "
                  f"{times['iabn'].median_wall() * 1e3:>9.3f}  {r.wall.text()}")
        results[part] = _part_ratio(per_layer)
    for part, ratio in results.items():
        target = " (target <= 1.0x)" if part == "head" else ""
        print(ratio.text(f"fwd+bwd time IABN / (BatchNorm2d + in-place LeakyReLU), {part} shapes") + target)
    if cuda:
        print(f"peak CUDA memory of one fwd+bwd, 4 x (conv1x1 + norm/act) at each shape, batch {batch}:")
        for name, channels, size in BACKBONE + HEAD:
            size = _scaled(size, spatial_div)
            bn_mib = memory_cuda("bn", batch, channels, size, device)
            iabn_mib = memory_cuda("iabn", batch, channels, size, device)
            results[f"memory_{name}"] = iabn_mib / bn_mib
            print(f"  {name:<20} BN+LReLU {bn_mib:9.1f} MiB, IABN {iabn_mib:9.1f} MiB, ratio {iabn_mib / bn_mib:.2f}x")
        memory = [v for k, v in results.items() if k.startswith("memory_")]
        print(f"summary: time IABN / BN backbone {results['backbone'].wall.text()}, "
              f"head {results['head'].wall.text()}; peak memory IABN / BN {min(memory):.2f}x-{max(memory):.2f}x "
              "over the shapes")
        return results
    mem_batch, mem_channels, mem_size = 4, 64, 64
    bn_mib = _memory_cpu("bn", mem_batch, mem_channels, mem_size)
    iabn_mib = _memory_cpu("iabn", mem_batch, mem_channels, mem_size)
    results["memory"] = iabn_mib / bn_mib
    print(f"peak RSS above the pre-step RSS, 20 x (conv3x3 {mem_channels}->{mem_channels} + norm/act) on "
          f"{mem_batch}x{mem_channels}x{mem_size}x{mem_size}: BN+LReLU {bn_mib:.0f} MiB, IABN {iabn_mib:.0f} MiB, "
          f"ratio {iabn_mib / bn_mib:.2f}x ({(1 - iabn_mib / bn_mib) * 100:.0f}% lower; target >= 35%)")
    return results


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(result if isinstance(result, int) else 0)
