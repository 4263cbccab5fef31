"""``train(config, workdir)``: the entry point that ``train.py`` and the tests call.

A run is trained by :func:`ganda_jax.train.loop.train_run` (the loop). A method with stages
(a classmethod ``stage_configs(config, workdir)``, e.g. CyCADA's pretrain -> pixel ->
feature) is trained stage by stage, each in ``workdir/<stage>``; a finished stage is skipped
on a re-run, an interrupted one resumes, and a later stage warm-starts
(``Method.warm_start``) from the final checkpoint of an earlier one
(:func:`ganda_jax.train.resume.restore_latest`).
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from ganda_jax import engine
from ganda_jax import methods as registry
from ganda_jax.train import parallel, resume
from ganda_jax.train.loop import compilation_cache_dir, train_run


def train(
    config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None, mesh=None
) -> engine.TrainState:
    """Trains (or resumes) ``config`` in ``workdir``; returns the final state.

    ``max_steps`` stops early after that many total steps (with a checkpoint), as
    an interruption would; the next call continues exactly where it stopped.
    For a method with stages the steps count over all stages, in order, and the
    state returned is that of the last stage trained.
    """
    parallel.maybe_initialize_distributed()  # before anything touches the backend
    cache = compilation_cache_dir(config, workdir)  # one for all stages: a resume finds it
    stage_configs = getattr(registry.get_method_class(config), "stage_configs", None)
    if stage_configs is None:
        return train_run(config, workdir, max_steps=max_steps, mesh=mesh, cache=cache)
    plan = stage_configs(config, workdir)
    state, offset = None, 0
    for i, (name, cfg) in enumerate(plan):
        stage_dir = os.path.join(workdir, name)
        total = int(cfg.num_train_steps)
        left = None if max_steps is None else int(max_steps) - offset
        if left is not None and left <= 0:
            break
        offset += total
        if i < len(plan) - 1 and resume.finished(stage_dir, total):
            logging.info("Stage %r is finished in %s; skipping it.", name, stage_dir)
            continue
        logging.info("Stage %r (%d/%d) in %s.", name, i + 1, len(plan), stage_dir)
        state = train_run(cfg, stage_dir, max_steps=left, mesh=mesh, cache=cache)
        if int(jax.device_get(state.step)) < total:  # stopped early: later stages must wait
            break
    return state
