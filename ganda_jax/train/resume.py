"""What a checkpoint must fit before it is restored, and warm starts.

A checkpoint that does not fit the config (other network sizes, other players) is refused
in one line naming the config differences, before Orbax is asked to read it (it would fail
deep in its async reader). :func:`restore_latest` loads another run's final state (a later
stage's warm start); :func:`finished` says whether a run reached its last step."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ganda_jax import engine
from ganda_jax.methods import get_method
from ganda_jax.train import checkpointing


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_fits(ckpt, step: int, meta: dict, abstract, config, method: str, what: str) -> None:
    """Raises a one-line ``ValueError`` if checkpoint ``step`` does not have ``abstract``'s
    shapes (other network sizes, other players), naming the config differences. Checked
    before restoring: Orbax would fail deep in its async reader, leaving noise."""
    misfit = _shape_mismatches(os.path.join(ckpt.directory, str(step), "state"), abstract)
    if misfit:
        diff = config_differences(meta.get("config", {}), config)
        raise ValueError(
            f"{what} {ckpt.directory}/{step} ({meta.get('method')}) does not fit this "
            f"{method} config: {misfit}; config differences (checkpoint vs now): "
            f"{diff or 'none found'}; use another --workdir"
        )


def _shape_mismatches(directory: str, abstract: engine.TrainState, limit: int = 3) -> str:
    """``''`` if the stored arrays have ``abstract``'s shapes, else the first differences
    (parameters, statistics and buffers; the optimizer state follows the parameters)."""
    stored = ocp.StandardCheckpointer().metadata(directory).item_metadata
    theirs = {_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    mine = {
        f"{field}/{_path(p)}": tuple(x.shape)
        for field in ("params", "model_state", "extra")
        for p, x in jax.tree_util.tree_leaves_with_path(getattr(abstract, field))
    }
    problems = []
    for key, shape in mine.items():
        if key not in theirs:
            problems.append(f"{key} is not in the checkpoint")
        elif theirs[key] != shape:
            problems.append(f"{key}: checkpoint {theirs[key]} vs now {shape}")
    extra = sorted(k for k in theirs if k.split("/")[0] in ("params", "extra") and k not in mine)
    problems += [f"{k} is only in the checkpoint" for k in extra]
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def config_differences(saved: dict, config: ml_collections.ConfigDict, limit: int = 6) -> str:
    """``'model.ngf: 4 vs 8; ...'`` for the leaves that differ between a checkpoint's
    saved config (JSON) and ``config`` (run-length keys such as num_train_steps too)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(json.loads(config.to_json_best_effort()))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    text = "; ".join(f"{k}: {a.get(k, '-')!r} vs {b.get(k, '-')!r}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def abstract_state(method: engine.Method, tx, sharding) -> engine.TrainState:
    """Shapes, dtypes and shardings of the train state, computed without data or FLOPs."""
    batch = method.example_batch(method.config.batch_size)
    shapes = jax.eval_shape(
        lambda rng, b: engine.init_state(method, tx, rng, b), jax.random.PRNGKey(0), batch
    )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore_latest(config: ml_collections.ConfigDict, workdir: str, sharding) -> engine.TrainState:
    """The latest checkpointed state of ``config``'s run in ``workdir`` (for warm starts).

    Raises a one-line ``FileNotFoundError`` if ``workdir`` holds no checkpoint.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"warm start: no checkpoint in {directory}; train that run first")
    ckpt = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"warm start: no checkpoint in {directory}; train that run first"
            )
        method = get_method(config)
        meta = ckpt.restore_meta(step)
        if meta.get("method") != method.name:
            raise ValueError(
                f"warm start: {directory}/{step} is from method {meta.get('method')!r}, "
                f"not {method.name!r}"
            )
        if step != int(config.num_train_steps):
            logging.warning(
                "warm start from %s at step %d of %d (that run is unfinished)",
                directory,
                step,
                config.num_train_steps,
            )
        abstract = abstract_state(method, engine.make_optimizer(method), sharding)
        check_fits(ckpt, step, meta, abstract, config, method.name, "warm start:")
        state, _ = ckpt.restore(abstract, step)
        logging.info("Warm start: loaded %s at step %d.", directory, step)
        return state
    finally:
        ckpt.close()


def finished(workdir: str, total: int) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return False
    ckpt = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    try:
        return ckpt.latest_step() == total
    finally:
        ckpt.close()
