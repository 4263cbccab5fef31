"""One method per file (its networks' use, its losses and its phase order) and the one
registry of them, which the trainer, the benchmarks and the generic tests read."""

from __future__ import annotations

import importlib

import ml_collections

from ganda_jax import engine

# config.method -> "module:Class"
METHODS = {
    "cyclegan": "ganda_jax.methods.cyclegan:CycleGAN",
    "discogan": "ganda_jax.methods.discogan:DiscoGAN",
    "pixelda": "ganda_jax.methods.pixelda:PixelDA",
    "cycada": "ganda_jax.methods.cycada:CyCADA",
    "gta": "ganda_jax.methods.gta:GTA",
    "gta_seg": "ganda_jax.methods.gta_seg:GTASeg",
    "ccgan": "ganda_jax.methods.ccgan:CCGAN",
}


def get_method_class(config: ml_collections.ConfigDict) -> type[engine.Method]:
    """``config.method``: a name in :data:`METHODS`, or ``"module:Class"`` (a method of your own,
    importable from ``sys.path``)."""
    spec = METHODS.get(config.method, config.method)
    if ":" not in spec:
        raise ValueError(
            f"unknown method {config.method!r}; known: {sorted(METHODS)} or 'module:Class'"
        )
    module, cls = spec.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config.method={config.method!r}: cannot import it ({e})") from None


def get_method(config: ml_collections.ConfigDict) -> engine.Method:
    return get_method_class(config)(config)
