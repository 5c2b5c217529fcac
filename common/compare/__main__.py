"""``python -m common.compare PROTOCOL``: one ``common.distill`` run per (method, seed) of a protocol, then the
report (compare.{md,csv,json,png} in ``--out``, printed). Finished runs are kept; a rerun does the rest."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from common.compare.launch import (
    REPO,
    Run,
    finished,
    full_command,
    gpu_slots,
    run_local,
    run_slurm,
    slurm_parameters,
    visible_gpus,
)
from common.compare.protocol import (
    SYNTHETIC_DATA,
    TEACHER_RUN,
    distill_args,
    load_protocol,
    run_dir,
    shipped_protocols,
    teacher_train_args,
)
from common.compare.report import write_report
from common.errors import UserError, main_guard
from common.io import output_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m common.compare", description=__doc__)
    p.add_argument("protocol", help=f"a shipped protocol ({', '.join(shipped_protocols())}) or a .toml file")
    p.add_argument("--methods", nargs="+", default=None, metavar="LABEL", help="only these methods of the protocol")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="number of seeds: the protocol's first N (continued upwards when N is larger)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: here, one run after another on a CPU, one per GPU slot at once on GPUs; "
                        "slurm: one submitit job per run")
    p.add_argument("--gpus-per-run", type=int, default=1, metavar="N",
                   help="GPUs of one run (local: torchrun; slurm: one task per GPU); the total batch is split")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="CPU runs at once (local, no GPU), each with its share of the cores as threads (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: local runs on the visible GPUs, else the CPU; SLURM jobs on GPUs")
    p.add_argument("--dry-run", action="store_true", help="print every command and exit")
    p.add_argument("--out", default=None, help="output folder (default: runs/compare/<protocol>)")
    slurm = p.add_argument_group("SLURM (--launcher slurm)")
    slurm.add_argument("--partition", default=None, help="SLURM partition")
    slurm.add_argument("--time", type=int, default=24 * 60, metavar="MIN", help="time limit of a job in minutes")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes of one run (its GPUs are split over them)")
    slurm.add_argument("--cpus-per-task", type=int, default=8, help="CPUs of one task (one task per GPU)")
    slurm.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default=None,
                       help="submitit executor (default: slurm when available; local/debug run the jobs here)")
    args = p.parse_args(argv)
    for flag, value in (("--seeds", args.seeds), ("--gpus-per-run", args.gpus_per_run), ("--jobs", args.jobs),
                        ("--nodes", args.nodes),
                        ("--time", args.time), ("--cpus-per-task", args.cpus_per_task)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    return args


def select(protocol, labels, seeds):
    """The protocol's methods named in ``labels`` (all when None) and its first ``seeds`` seeds."""
    methods = protocol.methods
    if labels:
        known = [m.label for m in methods]
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise UserError(f"--methods {unknown[0]!r} is not a method of protocol {protocol.name}; "
                            f"choose from {', '.join(known)}")
        methods = [m for m in methods if m.label in labels]
    chosen = list(protocol.seeds)
    if seeds is not None:
        chosen = chosen[:seeds]
        while len(chosen) < seeds:
            chosen.append(max(chosen) + 1)
    return methods, chosen


def make_runs(protocol, methods, seeds, out):
    runs = []
    if protocol.teacher["train"]:
        args = teacher_train_args(protocol, out)
        runs.append(Run(TEACHER_RUN, protocol.teacher["train"]["seed"], Path(out) / TEACHER_RUN, args, _stamp(args)))
    for method in methods:
        for seed in seeds:
            args = distill_args(protocol, method, seed, out)
            runs.append(Run(method.label, seed, run_dir(out, method.label, seed), args, _stamp(args)))
    return runs


def _stamp(args):
    return next(a.split("=", 1)[1] for a in args if a.startswith("compare_stamp="))


def batch_rule(protocol, gpus):
    """The one line on batch and lr: both are the protocol's; ``gpus`` processes split the total batch."""
    batch = protocol.train["batch"]
    if batch % gpus:
        raise UserError(f"the total batch {batch} of protocol {protocol.name} does not split over {gpus} GPUs; "
                        "choose --gpus-per-run dividing it")
    split = f"one process takes all {batch}" if gpus == 1 else f"each of the {gpus} GPUs of a run takes {batch // gpus}"
    return (f"batch/lr rule: the protocol fixes the total batch {batch} and the lr {protocol.train['lr']:g}; "
            f"{split} images per step, and the lr is not rescaled.")


def print_dry_run(runs, args, device, gpus):
    if args.launcher == "slurm":
        print(f"SLURM via submitit, one job per run: {slurm_parameters(args, args.gpus_per_run, device)}; "
              "each task runs:")
    elif gpus:
        print(f"local: {len(gpu_slots(gpus, args.gpus_per_run))} run(s) at once on GPUs {gpus}:")
    else:
        print("local: one run after another on the CPU:")
    for run in runs:
        cmd = full_command(run, device=device, gpus_per_run=args.gpus_per_run, torchrun=args.launcher == "local",
                           python="python")
        state = "finished, kept" if finished(run) else "to run"
        print(f"# {run.title} ({state})\ncd {shlex.quote(str(REPO))} && {shlex.join(cmd)}")


@main_guard
def main(argv=None):
    args = parse_args(argv)
    protocol = load_protocol(args.protocol, strict=not args.dry_run)
    methods, seeds = select(protocol, args.methods, args.seeds)
    out = Path(args.out or Path("runs") / "compare" / protocol.name).absolute()
    runs = make_runs(protocol, methods, seeds, out)
    gpus = visible_gpus() if args.launcher == "local" and args.device != "cpu" else []
    if args.device == "cuda" and args.launcher == "local" and not gpus:
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    device = "cpu" if args.device == "cpu" or (args.launcher == "local" and not gpus) else "cuda"
    world = args.gpus_per_run if device == "cuda" else 1
    print(f"protocol {protocol.name} ({protocol.path}): {len(methods)} method(s) x {len(seeds)} seed(s) "
          f"{seeds}; budget {protocol.budget}; output {out}")
    print(batch_rule(protocol, world))
    if protocol.budget == "wallclock":
        print(f"wall-clock budget: {protocol.seconds:g} s per run (--time-budget); iterations differ per method.")
    if args.dry_run:
        print_dry_run(runs, args, device, gpus)
        for note in protocol.missing:
            print(f"note: {note}")
        return
    output_dir(out, "--out")

    def launch(batch):
        if args.launcher == "slurm":
            return run_slurm(batch, args, gpus_per_run=world, device=device, cluster=args.slurm_cluster)
        return run_local(batch, gpus=gpus, gpus_per_run=args.gpus_per_run, jobs=args.jobs)

    start = time.perf_counter()
    teacher = [r for r in runs if r.label == TEACHER_RUN and protocol.teacher["train"]]
    if teacher and not finished(teacher[0]):
        print(f"training the teacher {protocol.teacher['network']} once (cached in {teacher[0].dir})", flush=True)
        launch(teacher)
        if not finished(teacher[0]):
            raise UserError(f"the teacher run failed; see {teacher[0].log}")
    elif teacher:
        print(f"teacher: cached in {teacher[0].dir}", flush=True)
    method_runs = [r for r in runs if r not in teacher]
    pending = [r for r in method_runs if not finished(r)]
    print(f"{len(method_runs) - len(pending)} of {len(method_runs)} runs finished already; running {len(pending)}",
          flush=True)
    if len(pending) > 1 and protocol.data["synthetic"] and not (out / SYNTHETIC_DATA / "synthetic.txt").is_file():
        launch(pending[:1])  # the first run writes the synthetic data the others read
        pending = pending[1:]
    if pending:
        launch(pending)
    failed = [(r.title, r.log) for r in method_runs if not finished(r)]
    text = write_report(protocol, method_runs, out, failed)
    print("\n" + text)
    print(f"report: {out}/compare.md, compare.csv, compare.json, compare.png; {time.perf_counter() - start:.0f} s")
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for title, log in failed:
            print(f"  {title}: {log}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
