"""Orbax checkpoints of the whole train state: async, atomic, keep the last N.

A checkpoint holds two items: ``state`` (the TrainState pytree: step, params,
optimizer state, BatchNorm statistics, method buffers such as image pools, and
the RNG) and ``meta`` (JSON: method name, data-iterator position, config). The
data iterator is a pure function of (seed, step), so the step is its position;
it is stored explicitly anyway so a mismatch is detected.

Orbax writes into a temporary directory and renames it when complete, so an
interrupted save never shadows the previous checkpoint (``scripts/chaos.py``
kills a run during writes to check that). A write that fails (a full disk)
surfaces as a one-line :class:`CheckpointError` naming the step, the cause and
the checkpoint that is still intact.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm


class CheckpointError(OSError):
    """A checkpoint could not be written; the message says which, why, and what is intact."""


# Tensorstore reports a failed file write as a ValueError carrying the OS error code.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_ADVICE = {
    errno.ENOSPC: "free space and re-run to resume",
    errno.EDQUOT: "free space (disk quota) and re-run to resume",
    errno.EFBIG: "raise the file-size limit (ulimit -f) and re-run to resume",
}


def _os_errno(e: BaseException) -> int | None:
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _OS_ERROR_CODE.search(str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy(
                [
                    cm.FixedIntervalPolicy(max(int(save_every), 1)),
                    cm.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=cm.LatestN(max(int(keep), 1)),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._pending: int | None = None  # the last save started (async: maybe unfinished)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves if the policy says so (every ``save_every`` steps, on preemption) or if forced.

        Raises :class:`CheckpointError` if this write, or the previous asynchronous one
        (which a save waits for), failed.
        """
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._write_error(e, step) from _cause_to_show(e)
        if saved:
            self._pending = step
        return saved

    def _write_error(self, e: Exception, step: int | None = None) -> CheckpointError:
        """One line: the step that failed (the newest one attempted that is not on disk),
        the OS cause, and the newest complete checkpoint (Orbax has logged the traceback)."""
        try:
            on_disk = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        except OSError:
            on_disk = []
        attempted = [s for s in (self._pending, step) if s is not None]
        failed = next((s for s in attempted if s not in on_disk), max(attempted, default=None))
        code = _os_errno(e)
        if code is not None:
            cause = f"{os.strerror(code)} [errno {code}]"
        else:
            lines = str(e).strip().splitlines()
            cause = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
        intact = [s for s in on_disk if failed is None or s < failed]
        kept = (
            f"the checkpoint at step {intact[-1]} in {self.directory} is intact"
            if intact
            else f"there is no earlier checkpoint in {self.directory}"
        )
        advice = _ADVICE.get(code, "fix that and re-run to resume")
        return CheckpointError(
            f"checkpoint at step {failed} could not be written ({cause}); {kept}; {advice}"
        )

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)``; ``abstract_state`` gives shapes, dtypes and shardings."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, dict(out.meta)

    def delete_after(self, step: int) -> None:
        """Deletes every checkpoint newer than ``step`` (a divergence rollback re-trains them)."""
        self.manager.wait_until_finished()
        doomed = [s for s in self.all_steps() if s > step]
        if jax.process_index() == 0:
            for s in doomed:
                # Rename, then delete: a kill mid-delete must not leave a half-deleted step
                # that the next run would take for the latest checkpoint (Orbax ignores and
                # later removes ``*.orbax-checkpoint-tmp`` directories).
                path = os.path.join(self.directory, str(s))
                doomed_path = f"{path}.orbax-checkpoint-tmp"
                shutil.rmtree(doomed_path, ignore_errors=True)
                os.rename(path, doomed_path)
                shutil.rmtree(doomed_path)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ganda_jax_checkpoint_delete_after")
        self.manager.reload()

    def wait(self) -> None:
        """Waits for the asynchronous write; raises :class:`CheckpointError` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from _cause_to_show(e)

    def close(self) -> None:
        try:
            self.wait()
        finally:  # Orbax raises a failed write once per thread: this close does not re-raise it
            self.manager.close()


def _cause_to_show(e: BaseException) -> BaseException | None:
    """None for an OS failure (a full disk): its traceback, a background thread's, adds
    nothing to the one-line message, and its frames hold the write's unfinished tasks, which,
    freed only at exit, can print dozens of "Exception ignored" tracebacks after the message;
    so they are freed now. Anything else may be a bug: its traceback is kept."""
    if _os_errno(e) is None:
        return e
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    gc.collect()
    return None
