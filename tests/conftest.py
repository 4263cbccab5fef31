"""Test set-up: 8 virtual CPU devices so sharding is exercised without accelerators."""

import os
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Many tests compile the same program twice (a run, then its resume in a new Run; a config
# rebuilt in another test): a persistent compilation cache, fresh per session so nothing
# carries over between sessions, turns the repeats into cache hits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ganda_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import importlib.util

import jax
import numpy as np
import pytest

from ganda_jax import methods as registry


def load_config(name: str, arg: str | None = None):
    """``get_config(arg)`` of ``configs/<name>.py``, unlocked for the test to edit."""
    spec = importlib.util.spec_from_file_location(
        f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    return cfg.unlock() if hasattr(cfg, "unlock") else cfg


# The registry's methods as test cases, CyCADA once per stage (test_methods*.py).
METHOD_CASES = {name: (name, {}) for name in registry.METHODS if name != "cycada"}
METHOD_CASES.update(
    {f"cycada-{s}": ("cycada", {"stage": s}) for s in ("pretrain", "pixel", "feature")}
)


def method_config(case: str, **overrides):
    """The ``runlocal`` config of a registry case (CyCADA per stage), batch 4."""
    name, variant = METHOD_CASES[case]
    cfg = load_config(name, "runlocal")
    cfg.batch_size = 4
    for k, v in {**variant, **overrides}.items():
        cfg[k] = v
    return cfg


@pytest.fixture
def config_loader():
    return load_config


def equal_trees(a, b) -> bool:
    """Same structure and bit-identical leaves."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def assert_phase_isolated(phase, players, before_params, before_opt, params, opt_state):
    """After ``phase``'s update, its players' parameters and optimizer states (Adam moments)
    changed, and every other player's are bit-identical: zero gradients alone would not do
    that under Adam (its momentum moves an idle player)."""
    for p in players:
        same_params = equal_trees(params[p], before_params[p])
        same_opt = equal_trees(opt_state.inner_states[p], before_opt.inner_states[p])
        if p in phase.players:
            assert not same_params and not same_opt, f"phase {phase.name} left {p} unchanged"
        else:
            assert same_params and same_opt, f"phase {phase.name} changed idle player {p}"


def assert_loss_terms(loss, aux, terms: dict, expected: float, rtol: float = 1e-5):
    """A phase loss's logged terms equal ``terms`` (names and values) and its total
    ``expected`` (both computed by hand from the paper's formula)."""
    assert set(aux.metrics) == set(terms)
    for k, v in terms.items():
        np.testing.assert_allclose(float(aux.metrics[k]), v, rtol=rtol, err_msg=k)
    np.testing.assert_allclose(float(loss), expected, rtol=rtol)
