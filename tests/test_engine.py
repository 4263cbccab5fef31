"""The shared engine: phase isolation, schedules, sharding equivalence, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_phase_isolated, equal_trees, load_config

from ganda_jax import engine, parallel, trainer


def _tiny_cyclegan(**overrides):
    cfg = load_config("cyclegan", "runlocal")
    cfg.batch_size = 8
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def run1():
    return trainer.Run(_tiny_cyclegan(), mesh=parallel.make_mesh(1))


def _state_after_steps(run, n):
    state = run.init_state()
    for s in range(n):
        state, _ = run.step_fn(state, run.global_batch(s))
    return state


def test_each_phase_updates_only_its_players(run1):
    # Two steps first so every player's Adam moments are non-zero: a zero
    # gradient would then still move an idle player (see the control below).
    state = _state_after_steps(run1, 2)
    state = jax.device_get(state)
    method, tx = run1.method, run1.tx
    batch = method.prepare(run1.global_batch(2))
    inputs = engine.PhaseInputs(
        batch=batch,
        rng=jax.random.PRNGKey(1),
        step=state.step,
        model_state=state.model_state,
        extra=state.extra,
        carry={},
    )
    for phase in method.phases():
        if phase.name == "D":  # the D phase needs the G phase's fakes
            _, aux = jax.jit(method.phases()[0].loss_fn)(state.params, inputs)
            inputs = inputs._replace(carry=aux["carry"])

        @jax.jit
        def update(params, opt_state, inputs, phase=phase):
            grads = jax.grad(lambda t: phase.loss_fn({**params, **t}, inputs)[0])(
                {p: params[p] for p in phase.players}
            )
            return grads, *engine.apply_phase_update(tx, params, opt_state, grads, phase.players)

        grads, params, opt_state = update(state.params, state.opt_state, inputs)
        assert_phase_isolated(
            phase, method.players, state.params, state.opt_state, params, opt_state
        )

        # Control: a plain multi_transform update with zero gradients for the idle
        # players moves them (Adam momentum), which is what apply_phase_update prevents.
        full = {
            p: grads[p] if p in phase.players else jax.tree.map(jnp.zeros_like, v)
            for p, v in state.params.items()
        }
        updates, _ = jax.jit(tx.update)(full, state.opt_state, state.params)
        naive = optax.apply_updates(state.params, updates)
        idle = [p for p in method.players if p not in phase.players]
        assert not all(equal_trees(naive[p], state.params[p]) for p in idle)


def test_train_step_runs_phases_in_order_and_advances_step(run1):
    state = run1.init_state()
    state, metrics = run1.step_fn(state, run1.global_batch(0))
    assert int(state.step) == 1
    assert {"loss/G", "loss/D", "G/cycle_A", "D/A"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # The D phase pushed this step's fakes into the pools.
    assert int(state.extra["pool_count_A"]) == min(8, run1.config.loss.pool_size)


def test_linear_decay_schedule():
    cfg = _tiny_cyclegan(num_train_steps=100)
    sched = engine.make_schedule(cfg.optimizer.G, 100)
    lr = cfg.optimizer.G.learning_rate
    np.testing.assert_allclose(
        [sched(0), sched(49), sched(50), sched(75), sched(100)],
        [lr, lr, lr, lr / 2, 0.0],
        rtol=1e-6,
        atol=1e-12,
    )


def test_eight_devices_match_one_device(run1):
    assert len(jax.devices()) == 8, "tests expect JAX_NUM_CPU_DEVICES=8"
    run8 = trainer.Run(_tiny_cyclegan(), mesh=parallel.make_mesh(8))
    states, losses = {}, {}
    for n, run in ((1, run1), (8, run8)):
        state = run.init_state()
        losses[n] = []
        for s in range(3):
            state, metrics = run.step_fn(state, run.global_batch(s))
            losses[n].append({k: float(v) for k, v in metrics.items()})
        states[n] = state
    assert states[8].params["G_AB"]["Conv_0"]["Conv_0"]["kernel"].sharding.is_fully_replicated
    for a, b in zip(losses[1], losses[8]):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
    # Compare what the networks compute rather than every raw parameter: the
    # conv biases in front of instance norm get a gradient that is exactly zero
    # in theory and float noise in practice, which Adam turns into +-lr steps,
    # so those biases legitimately differ with the reduction order (and change
    # nothing downstream, which this checks).
    method = run1.method
    x = method.prepare(run1.global_batch(10))
    for p in ("G_AB", "G_BA"):
        y1, y8 = (
            method.G.apply({"params": jax.device_get(states[n].params[p])}, x["A"]) for n in (1, 8)
        )
        np.testing.assert_allclose(np.asarray(y1), np.asarray(y8), atol=2e-4, err_msg=p)
    for p in ("D_A", "D_B"):
        y1, y8 = (
            method.D.apply({"params": jax.device_get(states[n].params[p])}, x["B"]) for n in (1, 8)
        )
        np.testing.assert_allclose(np.asarray(y1), np.asarray(y8), atol=2e-4, rtol=1e-3, err_msg=p)
    np.testing.assert_allclose(
        np.asarray(states[1].extra["pool_A"]), np.asarray(states[8].extra["pool_A"]), atol=1e-4
    )


def test_resume_is_bit_identical(tmp_path):
    # The 8-device program of test_eight_devices_match_one_device (checkpoint and log intervals
    # are not part of it): one compilation for both tests. runlocal trains 4 steps; the linear
    # decay starts at step 2, so the resumed half runs on the decaying schedule.
    cfg = _tiny_cyclegan(checkpoint_every_steps=100, log_every_steps=1)
    assert cfg.num_train_steps == 4
    mesh = parallel.make_mesh(8)
    straight = trainer.train(cfg, str(tmp_path / "straight"), mesh=mesh)
    first = trainer.train(cfg, str(tmp_path / "resumed"), max_steps=2, mesh=mesh)
    assert int(first.step) == 2
    resumed = trainer.train(cfg, str(tmp_path / "resumed"), mesh=mesh)
    assert int(resumed.step) == 4
    for field in ("params", "opt_state", "extra", "rng"):
        assert equal_trees(getattr(straight, field), getattr(resumed, field)), field
