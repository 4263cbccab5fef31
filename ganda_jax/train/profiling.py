"""A ``jax.profiler`` trace of some training steps (``config.profile_steps``)."""

from __future__ import annotations

import jax
from absl import logging


class StepProfiler:
    """A ``jax.profiler`` trace of ``num`` training steps, ``skip`` steps after this run's
    first (past compilation and warm-up), into ``directory`` (TensorBoard's profile plugin
    reads it; ``perfetto_trace.json.gz`` opens in ui.perfetto.dev). ``config.profile_steps``.
    """

    def __init__(self, directory: str, num: int, skip: int, first_step: int):
        self.directory, self.num = directory, int(num)
        self.start = int(first_step) + max(int(skip), 0)
        self.active = False

    def before(self, step: int, state) -> None:
        if self.num > 0 and not self.active and step >= self.start:
            jax.block_until_ready(state)  # the earlier steps finish outside the trace
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active, self.start = True, step

    def after(self, step: int, state) -> None:
        if self.active and step >= self.start + self.num:
            self.stop(step, state)

    def stop(self, step: int, state) -> None:
        if not self.active:
            return
        try:
            jax.block_until_ready(state)  # the traced steps' device work, not just dispatch
        except Exception:  # stopping in a failing run: its own error is the one to see
            logging.warning("Profile stopped without the last steps' device work")
        jax.profiler.stop_trace()
        self.active, self.num = False, 0
        logging.info("Profile of steps %d-%d written to %s", self.start, step - 1, self.directory)
