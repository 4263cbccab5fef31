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
(and ``test_methods_resume.py``: two steps in one go, and one step then a resume, give
bit-identical states).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import METHOD_CASES, assert_phase_isolated, equal_trees, method_config

from ganda_jax import engine
from ganda_jax.train import loop, parallel


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


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_each_phase_updates_only_its_players(case):
    run = loop.Run(method_config(case), mesh=parallel.make_mesh(1))
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


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_the_state_has_the_shapes_a_restore_expects(case):
    run = loop.Run(method_config(case), mesh=parallel.make_mesh(1))
    state, _ = _fresh_state(run)
    run.loader.close()
    abstract = run.abstract_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype)
