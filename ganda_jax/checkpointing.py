"""Orbax checkpoints of the whole train state: async, atomic, keep the last N.

A checkpoint holds two items: ``state`` (the TrainState pytree: step, params,
optimizer state, BatchNorm statistics, method buffers such as image pools, and
the RNG) and ``meta`` (JSON: method name, data-iterator position, config). The
data iterator is a pure function of (seed, step), so the step is its position;
it is stored explicitly anyway so a mismatch is detected.

Orbax writes into a temporary directory and renames it when complete, so an
interrupted save never shadows the previous checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves if the policy says so (every ``save_every`` steps, on preemption) or if forced."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
