"""`python -m common.tables` (`make tables`): print each paper's table, reported beside measured."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.errors import UserError, main_guard
from common.io import atomic_open, output_file
from common.tables.render import render_all, render_comparisons
from common.tables.schema import PAPERS

DEFAULT_DIRS = ("ckpt", "runs", "demo_runs")


def default_roots() -> list[Path]:
    """./ckpt, ./runs, ./demo_runs and every directory in $SEGKD_RESULTS (os.pathsep-separated)."""
    roots = [Path(d) for d in DEFAULT_DIRS]
    roots += [Path(p) for p in os.environ.get("SEGKD_RESULTS", "").split(os.pathsep) if p]
    return roots


@main_guard
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.tables", description=__doc__)
    parser.add_argument("--results-dir", action="append", default=None,
                        help="directory to scan for results.json (repeatable; default: ./ckpt ./runs ./demo_runs "
                             "and $SEGKD_RESULTS)")
    parser.add_argument("--paper", action="append", choices=PAPERS, default=None,
                        help="only this paper (repeatable; without it the comparison reports found are shown too)")
    parser.add_argument("--no-complexity", action="store_true", help="skip the computed Params/FLOPs columns")
    parser.add_argument("--output", default=None, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    roots = [Path(d) for d in args.results_dir] if args.results_dir else default_roots()
    missing = [str(d) for d in (args.results_dir or []) if not Path(d).is_dir()]
    if missing:
        raise UserError(f"results directory {missing[0]} does not exist; pass an existing --results-dir")
    text = render_all(args.paper or PAPERS, roots, complexity=not args.no_complexity)
    comparisons = "" if args.paper else render_comparisons(roots)
    if comparisons:
        text += "\n\n" + comparisons
    sys.stdout.write(text + "\n")
    if args.output:
        with atomic_open(output_file(args.output, "--output"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
