"""Batched, sharded inference over in-memory evaluation arrays (shared by all methods)."""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import jax
import numpy as np

from ganda_jax.train import parallel

_JITTED: "weakref.WeakKeyDictionary[Callable, Any]" = weakref.WeakKeyDictionary()


def _jitted(fn, mesh):
    per_fn = _JITTED.setdefault(fn, {})
    if mesh not in per_fn:
        per_fn[mesh] = jax.jit(fn, out_shardings=parallel.replicated(mesh))
    return per_fn[mesh]


def batched_apply(
    fn: Callable[[Any, dict], dict],
    params: Any,
    arrays: dict[str, np.ndarray],
    *,
    mesh,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Runs ``fn(params, batch) -> {name: per-example array}`` over all rows of ``arrays``.

    Every process must hold the same full ``arrays`` (the embedded test splits
    are generated identically everywhere). Batches are split over the mesh; the
    last one is padded and the padding dropped, so each example counts once.
    One compilation: every batch has the same shape.
    """
    n = len(next(iter(arrays.values())))
    devices = mesh.devices.size
    batch_size = max(devices, int(math.ceil(min(batch_size, n) / devices)) * devices)
    sharding = parallel.data_sharding(mesh)
    run = _jitted(fn, mesh)
    outputs: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        chunk = {}
        for k, v in arrays.items():
            part = v[start : start + batch_size]
            if len(part) < batch_size:
                pad = np.repeat(part[-1:], batch_size - len(part), axis=0)
                part = np.concatenate([part, pad])
            chunk[k] = jax.make_array_from_callback(
                part.shape, sharding, lambda idx, p=part: p[idx]
            )
        out = run(params, chunk)
        for k, v in out.items():
            outputs.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v)[:n] for k, v in outputs.items()}
