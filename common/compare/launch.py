"""Running the (method, seed) runs of a comparison: locally (one after another on a CPU, one per free GPU slot
at once on a GPU machine, torchrun with ``--gpus-per-run``) or on SLURM through submitit (one job per run).

A run is one command ``python -m common.distill ...`` writing into its own folder; its ``results.json``
(written last by distill) with the run's stamp marks it finished, and a finished run is never started again.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.distill import STATE_NAME
from common.errors import UserError
from common.tables.schema import RESULTS_NAME, read_results

LOG_NAME = "run.log"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    """One run: its label (method folder), seed, folder, distill arguments and stamp."""

    label: str
    seed: int
    dir: Path
    args: list
    stamp: str

    @property
    def log(self):
        return self.dir / LOG_NAME

    @property
    def title(self):
        return f"{self.label} seed {self.seed}"


def distill_command(run, gpus_per_run=1, python=None):
    """The command of ``run``: ``python -m common.distill ...``, under torchrun for several GPUs per run."""
    python = python or sys.executable
    if gpus_per_run > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus_per_run}",
                "-m", "common.distill", *run.args]
    return [python, "-m", "common.distill", *run.args]


def full_command(run, *, device, gpus_per_run=1, torchrun=True, python=None):
    """The exact command that runs ``run`` (printed by ``--dry-run``): distill on ``device``, resuming from the
    run folder's training state when there is one; under torchrun when ``torchrun`` and several GPUs per run."""
    resume = ["--resume"] if (run.dir / STATE_NAME).is_file() else []
    return distill_command(run, gpus_per_run if torchrun else 1, python) + ["--device", device, *resume]


def finished(run):
    """Whether ``run.dir`` holds the results.json of exactly this run (parses, fields present, same stamp)."""
    path = run.dir / RESULTS_NAME
    if not path.is_file():
        return False
    try:
        result = read_results(path)
    except (OSError, ValueError):
        return False
    stamps = (result.get("extra") or {}).get("protocol") or {}
    return result.get("seed") == run.seed and stamps.get("compare_stamp") == run.stamp


def prepare(run):
    """Before (re)starting ``run``: a results.json of other settings means the folder is stale and is cleared;
    otherwise the folder is kept so distill resumes from its checkpoint."""
    if (run.dir / RESULTS_NAME).is_file() and not finished(run):
        print(f"  {run.title}: {run.dir} holds a run of other settings; clearing it", flush=True)
        shutil.rmtree(run.dir)
    run.dir.mkdir(parents=True, exist_ok=True)


def _die_with_parent():
    """Child processes end when the comparison is killed (Linux ``PR_SET_PDEATHSIG``), so a rerun never finds
    an orphan still writing into a run folder."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def child_env(gpus=None, threads=None):
    """The environment of a run: the repository importable, its GPUs, its CPU threads (``OMP_NUM_THREADS``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def execute(cmd, log, env, cwd=REPO):
    """Run ``cmd`` with stdout and stderr into ``log`` (appended: a resumed run keeps its history); the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                              preexec_fn=preexec).returncode


def visible_gpus():
    """The GPU ids this process may use: $CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    import torch

    if not torch.cuda.is_available():
        return []
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is not None:
        return [g for g in text.split(",") if g.strip()]
    return list(range(torch.cuda.device_count()))


def gpu_slots(gpus, gpus_per_run):
    """Groups of ``gpus_per_run`` GPUs, one run on each group at a time."""
    if gpus and len(gpus) < gpus_per_run:
        raise UserError(f"--gpus-per-run {gpus_per_run} needs {gpus_per_run} GPUs but {len(gpus)} are visible; "
                        "lower --gpus-per-run")
    return [gpus[i:i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]


def cpu_threads(jobs):
    """CPU threads of each run when ``jobs`` run at once: the cores shared out (None for one job: torch's
    default). More threads than cores makes torch's CPU kernels wait on each other: on this project's 2-core
    machine under load, one ESPNet step at batch 8 took 6.2 s with 2 threads and 0.34 s with 1."""
    return None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)


def run_local(runs, *, gpus, gpus_per_run=1, jobs=1, python=None, execute_fn=execute):
    """Run ``runs`` here: ``jobs`` at a time on the CPU (no ``gpus``; the cores shared out), else one run per
    GPU slot at once.

    Returns ``{title: exit code}``; the output of each run goes to its ``run.log``.
    """
    slots = gpu_slots(gpus, gpus_per_run) if gpus else [None] * min(jobs, max(len(runs), 1))
    codes, lock, queue = {}, threading.Lock(), list(runs)
    total = len(queue)

    def worker(slot):
        while True:
            with lock:
                if not queue:
                    return
                run = queue.pop(0)
                index = total - len(queue)
            prepare(run)
            cmd = full_command(run, device="cpu" if slot is None else "cuda", gpus_per_run=len(slot or [0]),
                               python=python)
            where = "cpu" if slot is None else f"GPU {','.join(map(str, slot))}"
            print(f"[{index}/{total}] {run.title} on {where}; log {run.log}", flush=True)
            start = time.perf_counter()
            code = execute_fn(cmd, run.log, child_env(slot, None if slot else cpu_threads(jobs)))
            state = "done" if code == 0 and finished(run) else f"FAILED (exit {code})"
            print(f"[{index}/{total}] {run.title}: {state} in {time.perf_counter() - start:.0f} s", flush=True)
            with lock:
                codes[run.title] = code if code else (0 if finished(run) else 1)

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


class DistillJob:
    """The callable a SLURM task runs: the run's distill command, one process per task (GPU), output to the
    run's log. Under several tasks the torch.distributed variables come from submitit's job environment.
    ``checkpoint`` resubmits a preempted or timed-out job, which then resumes (``--resume``)."""

    def __init__(self, cmd, log):
        self.cmd, self.log = list(cmd), Path(log)

    def __call__(self):
        import submitit

        env = child_env()
        log = self.log
        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            env = child_env()
            if job.global_rank:
                log = log.with_name(f"{log.stem}.rank{job.global_rank}{log.suffix}")
        resume = (self.log.parent / STATE_NAME).is_file() and "--resume" not in self.cmd
        code = execute(self.cmd + ["--resume"] * resume, log, env)
        if code:
            raise RuntimeError(f"exit {code}; see {log}")
        return code

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(DistillJob(self.cmd, self.log))


def import_submitit():
    try:
        import submitit
    except ModuleNotFoundError as err:
        raise UserError("--launcher slurm needs submitit; install it with pip install 'segkd[slurm]'") from err
    return submitit


def slurm_parameters(opts, gpus_per_run, device):
    """submitit parameters of one run's job: one task per GPU over ``--nodes`` nodes (no GPU on ``cpu``)."""
    if gpus_per_run % opts.nodes:
        raise UserError(f"--gpus-per-run {gpus_per_run} cannot be split evenly over --nodes {opts.nodes}; "
                        "choose a multiple of the node count")
    gpus_per_node = gpus_per_run // opts.nodes
    params = {"timeout_min": opts.time, "nodes": opts.nodes, "tasks_per_node": gpus_per_node,
              "gpus_per_node": 0 if device == "cpu" else gpus_per_node, "cpus_per_task": opts.cpus_per_task}
    if opts.partition:
        params["slurm_partition"] = opts.partition
    return params


def run_slurm(runs, opts, *, gpus_per_run, device, python=None, cluster=None):
    """Submit one job per run (``cluster``: submitit's ``local``/``debug`` executors for tests), wait for all.

    Returns ``{title: 0 or 1}``; submitit's own logs of a run go to ``<run>/slurm/``.
    """
    submitit = import_submitit()
    jobs = []
    for run in runs:
        prepare(run)
        executor = submitit.AutoExecutor(folder=run.dir / "slurm", cluster=cluster)
        executor.update_parameters(name=f"segkd-{run.label}-s{run.seed}",
                                   **slurm_parameters(opts, gpus_per_run, device))
        cmd = full_command(run, device=device, torchrun=False, python=python)
        job = executor.submit(DistillJob(cmd, run.log))
        print(f"submitted {run.title}: job {job.job_id}; log {run.log}", flush=True)
        jobs.append((run, job))
    codes = {}
    for run, job in jobs:
        try:
            job.result()
            codes[run.title] = 0 if finished(run) else 1
        except Exception as err:  # a failed job: listed at the end, the table still prints
            print(f"{run.title}: job {job.job_id} failed: {str(err).strip().splitlines()[-1]}", flush=True)
            codes[run.title] = 1
    return codes
