"""A long SFD run that survives interruptions: periodic checkpoints, resume, SIGTERM/SIGINT.

``run_resilient(state, steps, checkpoint_root=...)`` advances ``state`` to ``steps`` total
iterations. It checkpoints every ``checkpoint_every`` steps (keeping the newest ``keep_last``),
resumes from the newest checkpoint when asked, and on SIGTERM/SIGINT finishes the current step,
saves, and returns ``interrupted=True`` instead of dying mid-write. Works the same in a single
process and under torchrun (the stop decision is agreed across ranks; rank 0 writes).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.faults import NonFiniteError, check_health
from ..core.state import SFDState
from ..io.atomic import CheckpointError
from ..core.step import train_step
from . import distributed as dist_utils
# Whole-state or sharded (DCP) checkpoints, whichever the state (FSDP2) or the folder holds.
from .sharded_checkpoint import resume_latest, save_checkpoint

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class RunResult:
    state: SFDState
    interrupted: bool = False            # a stop signal ended the run early (after saving)
    checkpoint: Path | None = None       # the last checkpoint written (rank 0), if any
    resumed_from: Path | None = None     # the checkpoint the run started from, if any
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that failed to verify
    log: list[dict[str, float]] = field(default_factory=list)

    def report_start_and_stop(self, say: Callable[[str], None] = print) -> bool:
        """Say where the run resumed from and whether a signal stopped it; True if it did (then the
        caller writes no final outputs: the checkpoint is the result)."""
        for path, why in self.skipped:
            say(f"skipped damaged checkpoint {path}: {why}")
        if self.resumed_from is not None:
            say(f"resumed from {self.resumed_from}" + (" (the newest checkpoint that verifies)" if self.skipped else ""))
        if self.interrupted:
            say(f"interrupted at step {self.state.step}; checkpoint {self.checkpoint}; continue with --resume")
        return self.interrupted


@contextlib.contextmanager
def stop_requested():
    """Yields a one-element list that becomes [True] on SIGTERM/SIGINT; old handlers come back after."""
    flag = [False]

    def handler(signum, frame):
        flag[0] = True
        log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_resilient(state: SFDState, steps: int, *, checkpoint_root: str | Path | None = None,
                  checkpoint_every: int = 0, keep_last: int | None = 3, resume: bool = False,
                  backend: str | None = None, log_every: int = 25,
                  on_log: Callable[[int, dict[str, float]], None] | None = None,
                  step_fn: Callable[[SFDState], dict] | None = None) -> RunResult:
    """Train ``state`` until ``state.step == steps`` (a total, so a resumed run ends where planned).

    One iteration is ``step_fn(state)`` (e.g. the fast path or a robust SFD step), by default
    ``train_step(state, backend)``.

    Metrics are reduced across ranks and pulled to the host every ``log_every`` steps, where
    the run is also stopped if updates keep coming out non-finite (``check_health``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 = only at the end and on a stop signal), "
                         f"got {checkpoint_every}")
    if (resume or checkpoint_every) and checkpoint_root is None:
        raise ValueError("resume and checkpoint_every need a checkpoint directory (checkpoint_root)")
    result = RunResult(state)
    if resume:
        found, result.skipped = resume_latest(checkpoint_root, state)
        for path, why in result.skipped:
            log.warning("skipping damaged checkpoint %s: %s", path, why)
        if found is None and result.skipped:
            raise CheckpointError(f"no checkpoint under {checkpoint_root} verifies ({len(result.skipped)} damaged); "
                                  f"the newest: {result.skipped[0][1]}")
        if found is None:
            log.warning("no checkpoint under %s: starting from step 0", checkpoint_root)
        result.resumed_from = found
    start = time.perf_counter()
    distributed = dist_utils.is_initialized()

    def save():
        result.checkpoint = save_checkpoint(state, checkpoint_root, keep_last) or result.checkpoint

    def check_health_or_name_last_good():
        try:
            check_health(state)
        except NonFiniteError as exc:  # say what the user can resume from
            last = result.checkpoint or result.resumed_from
            where = (f"the last good checkpoint is {last} (--resume continues from it)" if last else
                     "no checkpoint was written" + ("" if checkpoint_root is not None else
                                                    " (add --checkpoint-every N to keep good ones)"))
            raise NonFiniteError(f"{exc}; {where}") from None

    with stop_requested() as stop:
        while state.step < steps:
            metrics = step_fn(state) if step_fn is not None else train_step(state, backend)
            done = state.step == steps
            if state.step % log_every == 0 or done:
                host = {k: float(v) for k, v in dist_utils.reduce_metrics(metrics).items()}
                host["seconds"] = time.perf_counter() - start
                result.log.append({"step": state.step, **host})
                if on_log is not None and dist_utils.is_main():
                    on_log(state.step, host)
                check_health_or_name_last_good()
            # Single process: a Python flag, no sync. Ranks must agree (a save is collective):
            # one tiny all-reduce per step.
            if dist_utils.any_rank(stop[0]) if distributed else stop[0]:
                if checkpoint_root is not None:
                    save()
                result.interrupted = True
                return result
            if checkpoint_every and state.step % checkpoint_every == 0 and not done:
                check_health_or_name_last_good()
                save()
    if checkpoint_root is not None:
        save()
    return result
