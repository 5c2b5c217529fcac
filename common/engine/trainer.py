"""Plain training loop with hooks (detectron2 ``SimpleTrainer`` + ``HookBase`` style).

The loop only fetches a batch, calls the hooks and ``step_fn(batch, step) -> {name: scalar loss}``.
Steps are numbered ``start_step .. max_steps - 1`` and the loop stops after the last one, whatever
the data iterator still holds (SKD's loader ran past ``num_steps`` into a complex learning rate,
specs/ifvd_skd.md §B.2.2). Schedules, checkpoints, evaluation and logging are hooks, each with one job;
a hook with state (e.g. the best score so far) exposes ``state_dict()`` / ``load_state_dict()`` and the
trainer collects them under the hook's ``name`` (:meth:`Trainer.state_dict`).

An epoch-based run (AICSD) is this same loop over :func:`common.engine.data.epoch_batches`, with periods
given in steps (``n`` epochs = ``n * steps_per_epoch``).
"""
import math
import time

from tqdm import tqdm

from common.engine.dist import reduce_mean
from common.engine.lr import poly_lr, set_lr


class HookBase:
    """Override any of the four callbacks; ``self.trainer`` is set by :class:`Trainer`.

    A hook with state to resume defines ``state_dict()`` / ``load_state_dict(state)`` and a unique ``name``.
    """

    trainer = None
    name = None

    def before_train(self):
        pass

    def before_step(self):
        pass

    def after_step(self):
        pass

    def after_train(self):
        pass


class Trainer:
    """``Trainer(step_fn, data_iter, max_steps, start_step=0, hooks=[...]).train()``.

    During a step hooks see ``trainer.step`` (0-based index), ``trainer.scalars`` (values hooks
    add before the step, e.g. learning rates) and, after it, ``trainer.losses`` (floats).
    ``after_train`` runs even when a step raises (as in detectron2); ``trainer.completed`` tells
    whether the last step was reached.
    """

    def __init__(self, step_fn, data_iter, max_steps, start_step=0, hooks=()):
        if not 0 <= start_step <= max_steps:
            raise ValueError(f"Trainer: start_step {start_step} is outside [0, max_steps={max_steps}]")
        self.step_fn = step_fn
        self.data_iter = data_iter
        self.max_steps = max_steps
        self.start_step = start_step
        self.step = start_step
        self.losses = {}
        self.scalars = {}
        self.completed = False
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.trainer = self

    def stateful_hooks(self):
        """``{name: hook}`` of the hooks that carry resumable state."""
        hooks = {}
        for hook in self.hooks:
            if hasattr(hook, "state_dict"):
                if not hook.name or hook.name in hooks:
                    raise ValueError(f"Trainer: stateful hook {type(hook).__name__} needs a unique name")
                hooks[hook.name] = hook
        return hooks

    def state_dict(self):
        """The hooks' resumable state by name (the step count is saved by whoever saves the run)."""
        return {name: hook.state_dict() for name, hook in self.stateful_hooks().items()}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`; hooks absent from ``state`` keep their initial state."""
        for name, hook in self.stateful_hooks().items():
            if name in state:
                hook.load_state_dict(state[name])

    def train(self):
        for hook in self.hooks:
            hook.before_train()
        try:
            for step in range(self.start_step, self.max_steps):
                self.step = step
                try:
                    batch = next(self.data_iter)
                except StopIteration:
                    raise RuntimeError(
                        f"the data iterator ran out at step {self.step} of {self.max_steps}; size the train "
                        "set to max_steps * batch_size samples"
                    ) from None
                self.scalars = {}
                for hook in self.hooks:
                    hook.before_step()
                losses = self.step_fn(batch, self.step)
                self.losses = {name: float(value) for name, value in losses.items()}
                for hook in self.hooks:
                    hook.after_step()
            self.step = self.max_steps
            self.completed = True
        finally:
            for hook in self.hooks:
                hook.after_train()


class PolySpec:
    """One optimizer under the poly schedule: ``name`` labels its lr in the logs (e.g. "G", "D").

    ``groups="first"``: only ``param_groups[0]`` follows ``base_lr`` (the PSP lineage; CWD's adapter group keeps
    its initial lr); ``"all"``: every group follows its own ``initial_lr`` (AICSD's 10x head group).
    """

    def __init__(self, name, optimizer, base_lr, groups="first"):
        self.name = name
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.groups = groups


class LRSchedule(HookBase):
    """Poly learning rate set before every step (specs/ifvd_skd.md §C.7).

    Step ``s`` (0-based) uses ``it = s + first_index``: ``first_index=0`` is IFVD/CWD/CIRKD
    (it = 0..N-1), ``first_index=1`` is SKD (it = 1..N, last lr 0).
    """

    def __init__(self, specs, max_steps, power=0.9, first_index=0):
        if first_index not in (0, 1):
            raise ValueError(f"LRSchedule: first_index must be 0 (IFVD) or 1 (SKD), got {first_index}")
        self.specs = list(specs)
        self.max_steps = max_steps
        self.power = power
        self.first_index = first_index

    def before_step(self):
        it = self.trainer.step + self.first_index
        for spec in self.specs:
            lr = poly_lr(spec.base_lr, it, self.max_steps, self.power)
            if spec.groups == "first":
                set_lr(spec.optimizer, lr, "first")
            elif spec.groups == "all":
                for group in spec.optimizer.param_groups:
                    group["lr"] = poly_lr(group["initial_lr"], it, self.max_steps, self.power)
            else:
                raise ValueError(f"LRSchedule: groups must be 'first' or 'all', got {spec.groups!r}")
            self.trainer.scalars[f"{spec.name}_lr"] = lr


class _Periodic(HookBase):
    """Fire ``fn(n)`` after ``n`` completed steps when ``n >= start and (n - start) % every == 0`` (IFVD/CWD
    with start 40000, every 200: only at the end), when ``when(n)`` is true (any other rule, e.g. SKD's), and
    at the last step if ``final``.

    A run resumed at its last step (a kill during the final save or evaluation) runs no step; the final
    point is then produced again unless ``done()`` says its outputs exist (``done=None``: always).
    """

    def __init__(self, fn, *, every=None, start=0, final=True, when=None, done=None):
        self.fn = fn
        self.every = every
        self.start = start
        self.final = final
        self.when = when
        self.done = done

    def due(self, n):
        if self.every and n >= self.start and (n - self.start) % self.every == 0:
            return True
        return self.when is not None and self.when(n)

    def resumed_at_end(self):
        t = self.trainer
        return t.completed and t.start_step == t.max_steps and self.final and not (self.done and self.done())


class PeriodicCheckpoint(_Periodic):
    """Save with ``save_fn(completed_steps)`` at the points of :class:`_Periodic` (checkpoints only)."""

    def after_step(self):
        n = self.trainer.step + 1
        if self.due(n) or (self.final and n == self.trainer.max_steps):
            self.fn(n)

    def after_train(self):
        if self.resumed_at_end():
            self.fn(self.trainer.max_steps)


class PeriodicEval(_Periodic):
    """Evaluate with ``eval_fn(completed_steps) -> score`` at the points of :class:`_Periodic`; the final
    evaluation runs after training (also when a run resumes at its end; not after a crash).

    With ``on_best(n, score)`` it keeps the best so far (CIRKD's and AICSD's ``*_best_model.pth``): called
    whenever a score beats every earlier one; the best score and its step are resumable state.
    """

    name = "eval"

    def __init__(self, eval_fn, *, on_best=None, **when):
        super().__init__(eval_fn, **when)
        self.on_best = on_best
        self.best = None
        self.best_step = None

    def _evaluate(self, n):
        score = self.fn(n)
        if self.on_best is not None and score is not None and (self.best is None or score > self.best):
            self.best, self.best_step = float(score), n
            self.on_best(n, score)

    def after_step(self):
        n = self.trainer.step + 1
        if self.due(n) and not (self.final and n == self.trainer.max_steps):
            self._evaluate(n)

    def after_train(self):
        t = self.trainer
        if self.final and t.completed and (t.start_step < t.max_steps or self.resumed_at_end()):
            self._evaluate(t.max_steps)

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state):
        self.best, self.best_step = state["best"], state["best_step"]


class Logging(HookBase):
    """Per-step JSON line + tqdm bar (rank 0, interactive terminals) + a console line with ETA every ``period`` steps.

    Losses are averaged over ranks first (all ranks must carry this hook).
    """

    def __init__(self, run_logger, device="cpu", period=20, progress=True):
        self.logger = run_logger
        self.device = device
        self.period = period
        self.progress = progress and run_logger.enabled
        self.bar = None

    def before_train(self):
        t = self.trainer
        self.t0 = time.perf_counter()
        if self.progress:
            self.bar = tqdm(total=t.max_steps, initial=t.start_step, dynamic_ncols=True, leave=False, disable=None)
        self.logger.info(f"training steps {t.start_step}..{t.max_steps - 1}")

    def after_step(self):
        t = self.trainer
        losses = reduce_mean(t.losses, self.device)
        self.logger.log_step(t.step, **t.scalars, **losses)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
            self.bar.update(1)
        done = t.step + 1 - t.start_step
        if done % self.period == 0 or t.step + 1 == t.max_steps:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (t.max_steps - t.step - 1)
            items = " ".join(f"{k}:{v:.6g}" for k, v in {**t.scalars, **losses}.items())
            self.logger.info(f"step:{t.step:5d} {items} eta:{_hms(eta)}")

    def after_train(self):
        if self.bar is not None:
            self.bar.close()
        elapsed = _hms(time.perf_counter() - self.t0)
        if self.trainer.completed:
            self.logger.info(f"training done in {elapsed}")
        else:
            self.logger.info(f"training stopped during step {self.trainer.step} after {elapsed}")


def _hms(seconds):
    seconds = int(math.ceil(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
