"""What the loop does when a step goes non-finite or a discriminator wins outright
(``config.divergence``): the step's guard already kept the bad update out of the state;
this reads its flags, says what went wrong, and rolls back, stops or goes on."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging

from ganda_jax import engine
from ganda_jax.train import checkpointing

DIVERGENCE_ACTIONS = ("rollback", "stop", "skip")


class Divergence:
    """Reads the step's ``guard/*`` flags and the discriminator losses at each log step
    (``config.divergence``): says what went non-finite, and warns about collapse."""

    def __init__(self, config: ml_collections.ConfigDict, method: engine.Method):
        d = config.divergence
        if d.action not in DIVERGENCE_ACTIONS:
            raise ValueError(
                f"config.divergence.action={d.action!r}; expected one of {DIVERGENCE_ACTIONS}"
            )
        self.guard, self.action, self.max_rollbacks = d.guard, d.action, int(d.max_rollbacks)
        self.collapse_loss, self.collapse_steps = float(d.collapse_d_loss), int(d.collapse_steps)
        self.d_phases = tuple(method.discriminator_phases)
        self.low_steps: dict[str, int] = {}

    def problem(self, scalars: dict[str, float], step: int, n: int) -> str | None:
        """What was non-finite in the ``n`` steps ending at ``step``, or None."""
        if not self.guard:  # unguarded: any non-finite loss means the state is already bad
            bad = [k for k, v in scalars.items() if k.startswith("loss/") and not np.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"non-finite values at step {step}: {', '.join(bad)}; training stopped "
                    "(config.divergence.guard is off; the last checkpoint may be affected)"
                )
            return None
        skipped = round(scalars.get("guard/skipped", 0.0) * n)
        if not skipped:
            return None
        flagged = (
            lambda prefix: [  # noqa: E731
                k[len(prefix) :]
                for k, v in sorted(scalars.items())
                if k.startswith(prefix) and v > 0
            ]
        )
        return (
            f"{skipped} of steps {step - n + 1}..{step} produced NaN/inf (phase losses: "
            f"{', '.join(flagged('guard/loss/')) or 'finite'}; parameters or statistics of: "
            f"{', '.join(flagged('guard/params/')) or 'finite'}); those updates were not applied"
        )

    def collapse_hints(self, scalars: dict[str, float], step: int, n: int) -> None:
        """Warns when a discriminator loss stays near zero: D wins outright and the
        generator's adversarial gradient vanishes (a common prelude to mode collapse)."""
        if not self.collapse_steps:
            return
        for ph in self.d_phases:
            v = scalars.get(f"loss/{ph}")
            low = v is not None and np.isfinite(v) and abs(v) < self.collapse_loss
            self.low_steps[ph] = self.low_steps.get(ph, 0) + n if low else 0
            if self.low_steps[ph] >= self.collapse_steps:
                logging.warning(
                    "possible mode collapse at step %d: discriminator loss %r below %g for "
                    "%d steps; consider a lower D learning rate or resuming an earlier checkpoint",
                    step,
                    ph,
                    self.collapse_loss,
                    self.low_steps[ph],
                )
                self.low_steps[ph] = 0


def rollback(run, ckpt: checkpointing.Checkpointer, before: int, problem: str):
    """Restores the newest checkpoint from ``before`` or earlier (else the oldest one kept,
    else a fresh init: the guard keeps every saved state finite) and changes the data order."""
    if run.rollbacks >= int(run.config.divergence.max_rollbacks):
        raise FloatingPointError(
            f"{problem}; still diverging after {run.rollbacks} rollback(s), training stopped "
            f"(checkpoints in {ckpt.directory} are intact)"
        )
    ckpt.wait()
    steps = ckpt.all_steps()
    earlier = [s for s in steps if s <= before]
    target = max(earlier) if earlier else (min(steps) if steps else None)
    ckpt.delete_after(-1 if target is None else target)
    run.set_rollbacks(run.rollbacks + 1)
    if target is None:
        state = run.init_state()
    else:
        state, _ = ckpt.restore(run.abstract_state(), target)
    logging.warning(
        "Rollback %d/%d to step %d with a new data order.",
        run.rollbacks,
        run.config.divergence.max_rollbacks,
        target or 0,
    )
    return state, int(jax.device_get(state.step))
