"""What every trainer of every lineage does around the loop: its run folder (checked writable, stale temp files
removed), per-rank global seeds, the ``results.json`` fields it knows before its first evaluation, the arguments
at the top of the log and in ``args.json``, and its resumable ``training_state.pth`` (DESIGN.md, Conventions:
Checkpoints, Results).
"""
import json
from pathlib import Path

from common.engine.checkpoint import read_training_state, save_training_state, set_rng_state
from common.engine.dist import barrier
from common.engine.seed import seed_everything
from common.io import atomic_open, output_dir, remove_stale_temps

RUN_FILES = ("training_state.pth", "results.json", "args.json", "metrics.jsonl", "*.pth")


def prepare_run_dir(folder, flag, info, owned=RUN_FILES):
    """Before any work: create the run folder ``folder`` (given with ``flag``), check it is writable (one
    sentence naming the flag otherwise) and, on rank 0, delete the temporary files an interrupted atomic
    write of the files the run owns (``owned``: names or glob patterns) left there. Returns the folder."""
    folder = output_dir(folder, flag)
    if info.is_main:
        remove_stale_temps(folder, owned)
    return folder


def seed_rank(seed, info, start_step=0):
    """Give each rank its own global RNG streams (dropout masks) once the models are built identically: rank
    ``r > 0`` reseeds Python/NumPy/torch with ``seed + r + world_size * start_step``; rank 0, and so one
    process, is left untouched. The data sampler keeps its own seed, the same on every rank."""
    if info.rank:
        seed_everything(seed + info.rank + info.world_size * start_step)


def run_fields(paper, method, *, model, dataset, iterations, crop, batch, seed, teacher, extra, split="val"):
    """The ``results.json`` fields a training run knows before its first evaluation (DESIGN.md, Results)."""
    return {"paper": paper, "method": method, "model": model, "dataset": dataset, "split": split,
            "iterations": iterations, "crop": list(crop), "batch": batch, "seed": seed, "teacher": teacher,
            "extra": extra}


def method_name(flags, *, sep="_", full=None):
    """``results.json`` method from the ``(name, on)`` terms: ``full`` when all are on, else the names that
    are on joined by ``sep``, or "baseline" for none."""
    parts = [name for name, on in flags if on]
    if full is not None and len(parts) == len(flags):
        return full
    return sep.join(parts) or "baseline"


def log_args(logger, args):
    """The originals' ``key : value`` lines of the sorted arguments at the top of the log."""
    for key, value in sorted(vars(args).items()):
        logger.debug(f"{key} : {value}")


def write_args_json(folder, args, fields, info):
    """``<folder>/args.json``: the arguments and the run's results fields (val scripts read them back)."""
    if info.is_main:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with atomic_open(Path(folder) / "args.json", "w") as f:
            f.write(json.dumps({**vars(args), "run_info": fields}, indent=2) + "\n")


class RunState:
    """The run's ``training_state.pth``: the step's named modules and optimizers, the trainer's hook state,
    RNG, data position, and the settings ``run`` a resume must match (seed, steps, batch, ...).

    ``batch``: the per-rank batch, so the data position after ``n`` steps is ``n * batch`` samples. Assign
    ``trainer`` once the :class:`~common.engine.trainer.Trainer` exists, so its hook state is saved too.
    """

    def __init__(self, path, step, info, *, run, batch, extra=None):
        self.path = Path(path)
        self.step = step
        self.info = info
        self.run = dict(run)
        self.batch = batch
        self.extra = dict(extra or {})
        self.trainer = None
        self.resumed = None

    def save(self, n):
        """Save after ``n`` completed steps (rank 0 writes; every rank waits)."""
        if self.info.is_main:
            save_training_state(self.path, step=n, state=self.step.state_dict(),
                                hooks=self.trainer.state_dict() if self.trainer is not None else None,
                                run=self.run, extra=self.extra, data_position=n * self.batch)
        barrier()

    def resume(self, path, *, restore_rng=True):
        """Load ``path`` into the step (named modules and optimizers); returns the number of completed steps.
        The hook state is restored by :meth:`restore_hooks` once the trainer exists; with
        ``restore_rng=False`` call :meth:`restore_rng` after creating the data iterator."""
        state = read_training_state(path, run=self.run)
        self.step.load_state_dict(state, source=f"resume checkpoint {path}")
        self.resumed = state
        self.extra.update(state.get("extra", {}))
        if restore_rng:
            set_rng_state(state["rng"])
        return state["step"]

    def restore_rng(self):
        if self.resumed is not None:
            set_rng_state(self.resumed["rng"])

    def restore_hooks(self, trainer):
        """Bind ``trainer`` (its hook state is saved from now on) and restore the resumed hook state."""
        self.trainer = trainer
        if self.resumed is not None:
            trainer.load_state_dict(self.resumed.get("hooks", {}))


def state_every(every, skip):
    """The ``--state-every`` rule: the state after every ``every`` completed steps (0: never), except where
    ``skip(n)`` (a save point writes it itself)."""
    return lambda n: bool(every) and n % every == 0 and not skip(n)


def has_results(path, iterations):
    """Whether ``path`` is a ``results.json`` of the evaluation after ``iterations`` steps (a finished run is
    recognised by its outputs, not by its step counter)."""
    try:
        return json.loads(Path(path).read_text()).get("iterations") == iterations
    except (OSError, ValueError):
        return False
