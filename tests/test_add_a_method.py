"""examples/dann.py, the README's "Add a method": one file and one config, trained by the
trainer like any method in the package."""

import json
import sys

import jax
from conftest import ROOT, assert_phase_isolated

from ganda_jax import engine
from ganda_jax.train import loop, parallel, trainer


def test_an_eighth_method_trains_evaluates_and_keeps_idle_players(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(f"{ROOT}/examples")
    monkeypatch.delitem(sys.modules, "dann", raising=False)
    import dann_config

    cfg = dann_config.get_config().unlock()
    cfg.num_train_steps, cfg.log_every_steps, cfg.checkpoint_every_steps = 60, 20, 60
    cfg.data.num_train, cfg.data.num_test = 256, 200
    workdir = tmp_path / "wd"
    trainer.train(cfg, str(workdir), mesh=parallel.make_mesh(2))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss/FC" in x]
    assert [x["step"] for x in train] == [20, 40, 60]
    assert {"loss/D", "loss/source_only", "source_only/ce", "F/fool", "C/ce"} <= set(train[0])
    assert train[-1]["C/ce"] < train[0]["C/ce"]  # the task is learnt
    (ev,) = [x for x in lines if "eval/target_accuracy" in x]
    assert ev["eval/source_accuracy"] > 0.5 and ev["eval/source_only_source_accuracy"] > 0.5
    assert (
        ev["eval/adaptation_gain"] == ev["eval/target_accuracy"] - ev["eval/source_only_accuracy"]
    )

    # The engine's contract holds for it: each phase moves only its own players.
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    method, state = run.method, run.init_state()
    for s in range(2):
        state, _ = run.step_fn(state, run.global_batch(s))
    state = jax.device_get(state)
    inputs = engine.make_inputs(method, method.prepare(run.global_batch(2)), state, state.rng)
    assert set(engine.players(method)) == {"F", "C", "D", "F_src", "C_src"}
    for phase in engine.phases(method):
        grads = jax.grad(lambda t, ph=phase: ph.loss_fn({**state.params, **t}, inputs)[0])(
            {p: state.params[p] for p in phase.players}
        )
        params, opt = engine.apply_phase_update(
            run.tx, state.params, state.opt_state, grads, phase.players
        )
        assert_phase_isolated(
            phase, engine.players(method), state.params, state.opt_state, params, opt
        )
