"""Test set-up: 8 virtual CPU devices so sharding is exercised without accelerators."""

import os
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def load_config(name: str, arg: str | None = None):
    """``get_config(arg)`` of ``configs/<name>.py``, unlocked for the test to edit."""
    spec = importlib.util.spec_from_file_location(
        f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    return cfg.unlock() if hasattr(cfg, "unlock") else cfg


@pytest.fixture
def config_loader():
    return load_config
