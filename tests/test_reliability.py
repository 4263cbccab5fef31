"""Divergence guards and workdir safety: a NaN/inf step is never applied, the trainer rolls
back (new data order, bounded retries) or stops by config, and a workdir holding another
run's checkpoint is refused with both configs named and nothing overwritten."""

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import equal_trees, load_config

from ganda_jax import engine
from ganda_jax import methods as registry
from ganda_jax.methods import cyclegan
from ganda_jax.train import checkpointing, loop, parallel, resume, trainer

POISON_STEP = 3


def _config(**overrides):
    cfg = load_config("cyclegan", "runlocal")
    cfg.num_train_steps = 6
    cfg.checkpoint_every_steps = 1
    cfg.log_every_steps = 1
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


class Poisoned(cyclegan.CycleGAN):
    """CycleGAN whose generator loss is multiplied by NaN at POISON_STEP (so its gradients,
    hence G's parameters, would become NaN) when the batch is ``poison_batch`` (any batch if
    None): a new data order after a rollback then avoids it."""

    poison_sum: float | None = None

    def phases(self):
        g, *rest = super().phases()

        def loss_fn(params, inp):
            loss, aux = g.loss_fn(params, inp)
            hit = inp.step == POISON_STEP
            if self.poison_sum is not None:
                hit &= jnp.abs(jnp.sum(inp.batch["A"]) - self.poison_sum) < 1e-2
            return loss * jnp.where(hit, jnp.nan, 1.0), aux

        return (engine.Phase(g.name, g.players, loss_fn), *rest)


@pytest.fixture
def poisoned(monkeypatch):
    """Makes the trainer build ``Poisoned`` for the cyclegan configs of this test."""
    original = registry.get_method_class
    monkeypatch.setattr(  # the one registry: the trainer and every Run build methods from it
        registry,
        "get_method_class",
        lambda config: Poisoned if config.method == "cyclegan" else original(config),
    )
    monkeypatch.setattr(Poisoned, "poison_sum", None)
    return Poisoned


def _prepared_sum(run, step):
    return float(jnp.sum(run.method.prepare(run.loader.batch(step))["A"]))


def test_a_nonfinite_step_is_not_applied_and_says_where(poisoned):
    run = loop.Run(_config(), mesh=parallel.make_mesh(1))
    state = run.init_state()
    for s in range(POISON_STEP):
        state, metrics = run.step_fn(state, run.global_batch(s))
        assert float(metrics["guard/skipped"]) == 0.0
    before = jax.device_get(state)
    state, metrics = run.step_fn(state, run.global_batch(POISON_STEP))
    after = jax.device_get(state)
    assert int(after.step) == POISON_STEP + 1
    for field in ("params", "opt_state", "model_state", "extra", "rng"):
        assert equal_trees(getattr(after, field), getattr(before, field)), field
    m = jax.device_get(metrics)
    assert m["guard/skipped"] == 1.0 and m["guard/loss/G"] == 1.0
    assert m["guard/params/G_AB"] == 1.0 and m["guard/params/G_BA"] == 1.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))
    # Control: the next (clean) step is applied.
    state, metrics = run.step_fn(state, run.global_batch(POISON_STEP + 1))
    assert float(metrics["guard/skipped"]) == 0.0
    assert not equal_trees(jax.device_get(state.params), after.params)


def test_rollback_restores_an_earlier_checkpoint_with_a_new_data_order(tmp_path, poisoned):
    cfg = _config()
    probe = loop.Run(cfg, mesh=parallel.make_mesh(1))
    poisoned.poison_sum = _prepared_sum(probe, POISON_STEP)  # only the first data order
    probe.loader.close()
    workdir = str(tmp_path / "run")
    state = trainer.train(cfg, workdir, mesh=parallel.make_mesh(1))
    assert int(state.step) == cfg.num_train_steps
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    skipped = [x["step"] for x in lines if x.get("guard/skipped")]
    assert skipped == [POISON_STEP + 1]  # the poisoned step, reported once, then never again
    steps = [x["step"] for x in lines if "loss/G" in x]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # back to the checkpoint of step 3, then on
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        assert ckpt.restore_meta()["rollbacks"] == 1  # a resume keeps the new data order
    finally:
        ckpt.close()
    # The new order really differs (seeded by the rollback count), so the retry is not a replay.
    probe = loop.Run(cfg, mesh=parallel.make_mesh(1))
    probe.set_rollbacks(1)
    assert abs(_prepared_sum(probe, POISON_STEP) - poisoned.poison_sum) > 1e-2
    probe.loader.close()


@pytest.mark.slow  # CI's slow pass (default-suite time budget)
def test_rollbacks_are_bounded_then_training_stops(tmp_path, poisoned):
    cfg = _config()
    cfg.divergence.max_rollbacks = 2
    with pytest.raises(FloatingPointError, match=r"after 2 rollback\(s\)"):
        trainer.train(cfg, str(tmp_path / "run"), mesh=parallel.make_mesh(1))


def test_stop_action_names_the_loss_and_players_and_keeps_the_checkpoint(tmp_path, poisoned):
    cfg = _config()
    cfg.divergence.action = "stop"
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as err:
        trainer.train(cfg, workdir, mesh=parallel.make_mesh(1))
    msg = str(err.value)
    assert "steps 4..4" in msg and "phase losses: G" in msg and "G_AB" in msg, msg
    assert "\n" not in msg
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        assert ckpt.latest_step() == POISON_STEP
    finally:
        ckpt.close()


@pytest.mark.slow  # CI's slow pass (default-suite time budget)
def test_skip_action_goes_on_without_the_bad_update(tmp_path, poisoned):
    cfg = _config()
    cfg.divergence.action = "skip"
    workdir = str(tmp_path / "run")
    state = trainer.train(cfg, workdir, mesh=parallel.make_mesh(1))
    assert int(state.step) == cfg.num_train_steps
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [x["step"] for x in lines if "loss/G" in x]
    assert steps == [1, 2, 3, 4, 5, 6]  # no rollback, and the bad step logged once
    assert [x["step"] for x in lines if x.get("guard/skipped")] == [POISON_STEP + 1]


@pytest.mark.slow  # ~30 s: CI's slow pass
def test_collapse_hint_when_the_discriminator_loss_stays_near_zero(tmp_path, caplog, poisoned):
    poisoned.poison_sum = 1e30  # never hit; the same program as the tests above (compile cache)
    cfg = _config(checkpoint_every_steps=100)
    cfg.divergence.collapse_d_loss = 1e9  # every D loss counts as "near zero"
    cfg.divergence.collapse_steps = 3
    with caplog.at_level(logging.WARNING):
        trainer.train(cfg, str(tmp_path / "run"), max_steps=4, mesh=parallel.make_mesh(1))
    hints = [r.getMessage() for r in caplog.records if "mode collapse" in r.getMessage()]
    assert len(hints) == 1 and "at step 3" in hints[0] and "'D'" in hints[0], hints


def test_unknown_divergence_action_is_an_error():
    cfg = _config()
    cfg.divergence.action = "ignore"
    with pytest.raises(ValueError, match="divergence.action='ignore'"):
        trainer.train(cfg, "/nonexistent/never/created", mesh=parallel.make_mesh(1))


def _snapshot(directory):
    """``{relative path: sha256}`` of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_a_workdir_of_another_run_is_refused_naming_both_and_left_untouched(tmp_path, poisoned):
    poisoned.poison_sum = 1e30
    workdir = str(tmp_path / "run")
    trainer.train(_config(), workdir, max_steps=1, mesh=parallel.make_mesh(1))
    before = _snapshot(workdir)
    assert "config.json" in before and any(k.startswith("checkpoints/") for k in before)

    wider = _config()
    wider.model.ngf = 8
    with pytest.raises(ValueError) as err:
        trainer.train(wider, workdir, mesh=parallel.make_mesh(1))
    msg = str(err.value)
    assert "does not fit this cyclegan config: params/G_AB/" in msg, msg
    assert "model.ngf: 4 vs 8" in msg, msg
    assert "\n" not in msg
    # A warm start from that workdir (what CyCADA's later stages do) is checked the same way.
    with pytest.raises(ValueError) as err:
        resume.restore_latest(wider, workdir, parallel.replicated(parallel.make_mesh(1)))
    msg = str(err.value)
    assert msg.startswith("warm start: ") and "model.ngf: 4 vs 8" in msg, msg
    assert "does not fit this cyclegan config: params/G_AB/" in msg and "\n" not in msg, msg

    other = load_config("discogan", "runlocal")
    with pytest.raises(ValueError, match="from method 'cyclegan', not 'discogan'"):
        trainer.train(other, workdir, mesh=parallel.make_mesh(1))
    assert _snapshot(workdir) == before


def test_batch_size_not_divisible_by_the_devices_is_an_error():
    cfg = _config(batch_size=6)
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 devices"):
        loop.Run(cfg, mesh=parallel.make_mesh(4))
