"""Shared pieces of the ml_collections configs in ``configs/``.

Every config has the same top-level names (``seed``, ``batch_size``,
``num_train_steps``, ``image_size``, ``dtype``, ``data`` (built by
:func:`ganda_jax.data.tasks.data_block`), ``optimizer``,
``checkpoint_every_steps``, ...), so flags and tools work across methods.
Variants are chosen with ``--config=configs/x.py:variant1,variant2``.
"""

from __future__ import annotations

import ml_collections


def base(method: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.batch_size = 1
    c.num_train_steps = 1000
    c.image_size = 64
    c.dtype = "float32"  # compute dtype; parameters and loss reductions stay float32
    c.num_devices = 0  # 0: all devices
    # Training steps per dispatch (lax.scan over a stack of batches in one jitted program):
    # hides the host's per-step dispatch for small models on fast chips (GPU/TPU; XLA:CPU
    # runs a loop body off its fast conv kernels). Logs, checkpoints and evaluations still
    # happen at their exact steps.
    c.steps_per_call = 1
    # Methods with a comparison baseline (PixelDA, CyCADA's feature stage, GTA, CC-GAN: a
    # source-only / supervised-only network trained in the same step, for eval's *_gain
    # metrics) train it unless this is False, which saves its share of every step.
    c.train_baselines = True
    # Adaptation methods also train a target oracle in the same step (the task network on
    # target *training* labels, never used by the method) for eval/oracle_* and
    # eval/gap_closed; it needs a labelled target training split.
    c.train_oracle = True
    # > 0: the train state also keeps a moving average of every player's parameters
    # (engine.update_ema, e.g. 0.998: a horizon of ~500 steps), and evaluation, samples
    # and exports use it instead of the last iterate, which in a GAN game swings.
    c.ema_decay = 0.0
    # > 0: a jax.profiler trace of that many steps, profile_skip_steps after the run's first
    # (past compilation), into workdir/profile (TensorBoard's profile plugin; Perfetto).
    c.profile_steps = 0
    c.profile_skip_steps = 5
    # JAX's persistent compilation cache, so that a resumed run (after a preemption or a
    # crash) loads its compiled programs instead of compiling them again: "auto" is
    # workdir/compilation_cache (unless JAX already has a cache directory, e.g. from
    # JAX_COMPILATION_CACHE_DIR), "" turns it off, any other value is the directory.
    c.compilation_cache_dir = "auto"
    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0: only at the end
    c.sample_every_steps = 0  # 0: only at the end
    c.eval_batch_size = 64
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.divergence = divergence_block()
    return c


def divergence_block(**kw) -> ml_collections.ConfigDict:
    """What the trainer does about NaN/inf and collapsing discriminators (``config.divergence``).

    ``guard``: a step with a non-finite loss, parameter or BatchNorm statistic is
    not applied (checked inside the jitted step). ``action`` when the trainer sees
    one (at the next log step): ``rollback`` to the last checkpoint before it and
    continue with a new data order (at most ``max_rollbacks`` times, then stop),
    ``stop`` with a message, or ``skip`` (warn and go on without those updates).
    A discriminator phase loss below ``collapse_d_loss`` for ``collapse_steps``
    consecutive steps logs a mode-collapse warning (0 turns it off).
    """
    d = dict(
        guard=True,
        action="rollback",
        max_rollbacks=3,
        collapse_d_loss=1e-3,
        collapse_steps=500,
    )
    d.update(kw)
    return ml_collections.ConfigDict(d)


def adam(
    learning_rate: float,
    b1: float = 0.5,
    b2: float = 0.999,
    schedule: str = "constant",
    decay_start: float = 0.5,
) -> ml_collections.ConfigDict:
    """One optimizer block (``config.optimizer.<group>``)."""
    return ml_collections.ConfigDict(
        dict(
            name="adam",
            learning_rate=learning_rate,
            b1=b1,
            b2=b2,
            schedule=schedule,
            decay_start=decay_start,
            grad_clip_norm=0.0,
        )
    )


def parse_variants(arg: str | None, known: set[str]) -> set[str]:
    variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
    unknown = variants - known
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; known: {sorted(known)}")
    return variants
