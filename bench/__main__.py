"""``make bench``: run every benchmark module in turn (or the ones named on the command line)."""
import argparse
import importlib
import time

MODULES = ("abn", "cwd", "ifvd", "skd_train", "skd_esp")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run: {', '.join(MODULES)} (default: all)")
    names = parser.parse_args().names or MODULES
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"bench.{name}").main()
        print(f"(bench.{name} took {time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
