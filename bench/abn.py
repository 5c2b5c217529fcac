"""InPlace-ABN benchmark (specs/inplace_abn.md §7.4): the compiled layer against nn.BatchNorm2d + in-place
LeakyReLU, measured in the same run; prints ratios (< 1 = InPlace-ABN is faster / smaller).

Time: forward+backward of the norm layer alone on the PSPNet-R101 shapes (batch 8, 512x512 crops, output
stride 8), scaled down for a small CPU by SCALE (batch and spatial size) with the channel counts and the
spatial ratios kept. Memory: peak RSS growth of one training step of a 20-block conv->norm->act stack, each
variant in a fresh subprocess.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import benchmark

# (name, channels, feature size at a 512x512 crop) for PSPNet-R101 (dilated ResNet, output stride 8).
BACKBONE = [("stem", 128, 256), ("layer1", 256, 128), ("layer2", 512, 64), ("layer3", 1024, 64),
            ("layer4", 2048, 64)]
HEAD = [("psp_bottleneck/dsn", 512, 64), ("psp_stage6", 512, 6), ("psp_stage3", 512, 3), ("psp_stage2", 512, 2),
        ("psp_stage1", 512, 1)]


def _scaled(size, spatial_div):
    return max(1, size // spatial_div) if size > 6 else size


def _time(fn, min_run_time):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def time_layer(batch, channels, size, min_run_time, dtype=torch.float32):
    from common.abn import InPlaceABN

    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, channels, size, size, dtype=dtype)
    bn = nn.BatchNorm2d(channels).to(dtype)
    iabn = InPlaceABN(channels).to(dtype)

    def native():
        y = F.leaky_relu(bn(x.clone()), 0.01, inplace=True)
        y.backward(g)

    def inplace():
        y = iabn(x.clone())
        y.backward(g)

    native(), inplace()
    t_native, t_iabn = [], []
    for _ in range(2):  # interleave the variants (§7.4)
        t_native.append(_time(native, min_run_time))
        t_iabn.append(_time(inplace, min_run_time))
    return min(t_native), min(t_iabn)


def _stack(norm, channels, blocks=20):
    from common.abn import InPlaceABN

    layers = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if norm == "bn":
            layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True)]
        else:
            layers.append(InPlaceABN(channels))
    return nn.Sequential(*layers)


def memory_child(norm, batch, channels, size):
    """Runs in a fresh process: peak RSS growth (MiB) of one forward+backward of the 20-block stack."""
    torch.manual_seed(0)
    model = _stack(norm, channels)
    x = torch.randn(batch, channels, size, size)
    with open("/proc/self/statm") as f:
        before_kib = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    model(x).sum().backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (peak_kib - before_kib) / 1024}))


def _memory(norm, batch, channels, size):
    out = subprocess.run([sys.executable, "-m", "bench.abn", "--memory-child", norm, str(batch), str(channels),
                          str(size)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="batch (the PSPNet recipe uses 8; 2 fits a small CPU)")
    parser.add_argument("--spatial-div", type=int, default=4, help="divide the 512x512-crop feature sizes by this")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.memory_child:
        norm, batch, channels, size = args.memory_child
        return memory_child(norm, int(batch), int(channels), int(size))

    from common.abn import extension_available
    from common.abn._backend import BUILD_HINT

    if not extension_available():
        print(f"bench abn: the InPlace-ABN extension is not built; {BUILD_HINT}")
        return 1
    batch = args.batch
    print(f"bench abn: CPU, {torch.get_num_threads()} threads, float32; PSPNet-R101 shapes at batch 8 / 512x512 "
          f"scaled to batch {batch}, spatial / {args.spatial_div} (channels and spatial ratios kept)")
    print(f"{'layer':<20} {'shape':<20} {'BN+LReLU ms':>12} {'IABN ms':>9} {'ratio':>6}")
    totals = {}
    for part, layers in (("backbone", BACKBONE), ("head", HEAD)):
        tot_native = tot_iabn = 0.0
        for name, channels, size in layers:
            size = _scaled(size, args.spatial_div)
            t_native, t_iabn = time_layer(batch, channels, size, args.min_run_time)
            tot_native += t_native
            tot_iabn += t_iabn
            shape = f"{batch}x{channels}x{size}x{size}"
            print(f"{name:<20} {shape:<20} {t_native * 1e3:>12.2f} {t_iabn * 1e3:>9.2f} {t_iabn / t_native:>6.2f}")
        totals[part] = tot_iabn / tot_native
    for part, ratio in totals.items():
        target = " (target <= 1.0x)" if part == "head" else ""
        print(f"fwd+bwd time ratio IABN / (BatchNorm2d + in-place LeakyReLU), {part} shapes: {ratio:.2f}x{target}")
    mem_batch, mem_channels, mem_size = 4, 64, 64
    bn_mib = _memory("bn", mem_batch, mem_channels, mem_size)
    iabn_mib = _memory("iabn", mem_batch, mem_channels, mem_size)
    print(f"peak RSS above the pre-step RSS, 20 x (conv3x3 {mem_channels}->{mem_channels} + norm/act) on "
          f"{mem_batch}x{mem_channels}x{mem_size}x{mem_size}: BN+LReLU {bn_mib:.0f} MiB, IABN {iabn_mib:.0f} MiB, "
          f"ratio {iabn_mib / bn_mib:.2f}x ({(1 - iabn_mib / bn_mib) * 100:.0f}% lower; target >= 35%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
