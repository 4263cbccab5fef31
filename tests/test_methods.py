"""What every method in the registry must do, checked the same way for each.

Each method's own test file checks what is particular to it (its networks, its losses
against numpy, its evaluation); these are the engine's promises, parametrized over
``ganda_jax.methods.METHODS`` (CyCADA once per stage), so a method added to the registry is
covered without a new test:

- every phase updates only its players: their parameters and optimizer state move, every
  other player's (and its BatchNorm statistics) stay bit-identical, through the same
  :func:`engine.run_phases` the jitted step runs;
- every phase's loss is a finite scalar; the state's shapes match what a checkpoint restore
  expects (:func:`resume.abstract_state`, from ``example_batch`` alone);
- training two steps in one go and one step, then a resume, give bit-identical states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_phase_isolated, equal_trees, load_config

from ganda_jax import engine
from ganda_jax import methods as registry
from ganda_jax.train import loop, parallel, trainer

CASES = {name: (name, {}) for name in registry.METHODS if name != "cycada"}
CASES.update({f"cycada-{s}": ("cycada", {"stage": s}) for s in ("pretrain", "pixel", "feature")})


def _config(case: str, **overrides):
    name, variant = CASES[case]
    cfg = load_config(name, "runlocal")
    cfg.batch_size = 4
    for k, v in {**variant, **overrides}.items():
        cfg[k] = v
    return cfg


def _fresh_state(run: loop.Run):
    """The initial state without the method's warm start (a later CyCADA stage's needs an
    earlier stage's checkpoint), with every float of the optimizer state set non-zero: an
    idle player's Adam moments then move it unless the engine leaves it alone."""
    batch = run.global_batch(0)
    state = jax.jit(lambda r, b: engine.init_state(run.method, run.tx, r, b))(
        jax.random.PRNGKey(0), batch
    )
    moments = jax.tree.map(
        lambda x: jnp.full_like(x, 1e-3) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        state.opt_state,
    )
    return state.replace(opt_state=moments), batch


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_phase_updates_only_its_players(case):
    run = loop.Run(_config(case), mesh=parallel.make_mesh(1))
    method, tx = run.method, run.tx
    state, batch = _fresh_state(run)
    run.loader.close()
    record = jax.jit(lambda s, b: engine.run_phases(method, tx, s, method.prepare(b), record=True))
    new_state, metrics, after = record(state, batch)

    phases = [ph for _, ph in engine.training_phases(method)]
    players = engine.players(method)
    assert set(players) == {p for ph in phases for p in ph.players}, "a player no phase trains"
    params, opt_state, stats = state.params, state.opt_state, state.model_state
    for phase, (new_params, new_opt, new_stats) in zip(phases, after):
        assert_phase_isolated(phase, players, params, opt_state, new_params, new_opt)
        for p in set(stats) | set(new_stats):  # BatchNorm statistics: only its players'
            if p not in phase.players:
                assert equal_trees(stats.get(p), new_stats.get(p)), f"{phase.name} changed {p}'s"
        loss = metrics[f"loss/{phase.name}"]
        assert loss.shape == () and np.isfinite(loss), (phase.name, loss)
        params, opt_state, stats = new_params, new_opt, new_stats
    assert all(np.all(np.isfinite(v)) for v in metrics.values())
    assert equal_trees(new_state.params, params) and equal_trees(new_state.opt_state, opt_state)

    # Control: a plain multi_transform update with zero gradients moves the players through
    # their Adam moments, which is what the engine's per-phase update prevents.
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = jax.jit(tx.update)(zeros, state.opt_state, state.params)
    moved = optax.apply_updates(state.params, updates)
    assert not all(equal_trees(moved[p], state.params[p]) for p in players)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_state_has_the_shapes_a_restore_expects(case):
    run = loop.Run(_config(case), mesh=parallel.make_mesh(1))
    state, _ = _fresh_state(run)
    run.loader.close()
    abstract = run.abstract_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype)


@pytest.mark.parametrize(
    "case", sorted(c for c in CASES if not c.startswith("cycada")) + ["cycada"]
)
def test_resume_is_bit_identical(case, tmp_path):
    """Two steps straight, against one step, a new process's worth of objects, one more.
    CyCADA trains all its stages (two steps each): the resume lands inside the pixel stage,
    after the warm start from the finished pretrain stage."""
    if case == "cycada":
        cfg = load_config("cycada", "runlocal")
        cfg.batch_size, cfg.stage_steps = 4, {"pretrain": 2, "pixel": 2, "feature": 2}
        stop = 3
    else:
        cfg, stop = _config(case, num_train_steps=2), 1
    cfg.checkpoint_every_steps, cfg.log_every_steps = 100, 1
    mesh = parallel.make_mesh(2)
    straight = trainer.train(cfg, str(tmp_path / "straight"), mesh=mesh)
    first = trainer.train(cfg, str(tmp_path / "resumed"), max_steps=stop, mesh=mesh)
    assert int(first.step) == (1 if case == "cycada" else stop)
    resumed = trainer.train(cfg, str(tmp_path / "resumed"), mesh=mesh)
    assert int(resumed.step) == int(straight.step)
    for field in ("params", "opt_state", "model_state", "extra", "rng"):
        assert equal_trees(getattr(straight, field), getattr(resumed, field)), field
