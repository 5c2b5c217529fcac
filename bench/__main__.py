"""``make bench``: run every benchmark module in turn (or the ones named on the command line).

Every module times its variants interleaved and prints ratios with their spread (bench/timing.py);
``--rounds N`` overrides each module's number of rounds (e.g. ``python -m bench cwd --rounds 3`` for a
quick check on a busy machine). A benchmark is any module of this package with ``main(argv)`` (argv: a list
of flags, at least ``--rounds``); new ones run after the PSP-lineage ones, in name order.
"""
import argparse
import importlib
import pkgutil
import time
from pathlib import Path

FIRST = ("abn", "cwd", "ifvd", "skd_train", "skd_esp")
HELPERS = ("timing",)
FOUND = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
               if not m.name.startswith("_") and m.name not in HELPERS)
MODULES = tuple(name for name in FIRST if name in FOUND) + tuple(name for name in FOUND if name not in FIRST)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds of every module (default: its own)")
    args = parser.parse_args()
    names = args.names or MODULES
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    argv = [] if args.rounds is None else ["--rounds", str(args.rounds)]
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"bench.{name}").main(argv)
        print(f"(bench.{name} took {time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
