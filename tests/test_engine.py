"""The shared engine: phase isolation, schedules, sharding equivalence, exact resume."""

import glob
import gzip
import json

import jax
import numpy as np
import pytest
from conftest import equal_trees, load_config

from ganda_jax import engine
from ganda_jax import methods as registry
from ganda_jax.metrics import classify_eval
from ganda_jax.train import loop, parallel, trainer


def _tiny_cyclegan(**overrides):
    cfg = load_config("cyclegan", "runlocal")
    cfg.batch_size = 8
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def run1():
    return loop.Run(_tiny_cyclegan(), mesh=parallel.make_mesh(1))


def _state_after_steps(run, n):
    state = run.init_state()
    for s in range(n):
        state, _ = run.step_fn(state, run.global_batch(s))
    return state


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


def _sgd_cyclegan():
    cfg = _tiny_cyclegan()
    for block in cfg.optimizer.values():
        block.name, block.learning_rate = "sgd", 0.05
    return cfg


def test_eight_devices_match_one_device():
    """A step on 8 devices computes what it computes on 1: losses, updates, buffers.

    Each of 3 steps starts both meshes from the same state (the 1-device run's), with SGD,
    so a step's update is -lr times its gradient. The losses agree to float rounding. The
    updates agree to a few percent, not to rounding: the tiny generator's input gradient
    jumps where a ReLU or a norm's statistic crosses a threshold, and a 1e-6 relative change
    of its input (the last bits another reduction order changes) moved it by 4% (measured
    on one device), so the cycle loss's gradient of the inner generator inherits such jumps.
    A sharding error (a gradient from one device's shard, or a sum where a mean belongs)
    would be off by 50% or more. Independent multi-step runs would compare those jumps
    compounded (and Adam turns gradients that are zero in theory into +-lr steps).
    """
    assert len(jax.devices()) == 8, "tests expect JAX_NUM_CPU_DEVICES=8"
    run1, run8 = (loop.Run(_sgd_cyclegan(), mesh=parallel.make_mesh(n)) for n in (1, 8))
    state = run1.init_state()
    for s in range(3):
        before = jax.device_get(state)  # a host copy: the steps donate their input state
        state8, metrics8 = run8.step_fn(
            jax.device_put(before, run8.replicated), run8.global_batch(s)
        )
        state, metrics1 = run1.step_fn(state, run1.global_batch(s))
        assert state8.params["G_AB"]["Conv_0"]["Conv_0"]["kernel"].sharding.is_fully_replicated
        for k in metrics1:
            np.testing.assert_allclose(
                float(metrics1[k]), float(metrics8[k]), rtol=1e-5, atol=1e-6, err_msg=f"{s}: {k}"
            )
        after1, after8 = jax.device_get(state), jax.device_get(state8)
        for p in after1.params:
            d1, d8 = (
                np.concatenate(
                    [
                        (a - b).ravel()
                        for a, b in zip(
                            jax.tree.leaves(x.params[p]), jax.tree.leaves(before.params[p])
                        )
                    ]
                )
                for x in (after1, after8)
            )
            assert np.linalg.norm(d1) > 1e-3, (s, p)  # the step moved it: not vacuous
            err = np.linalg.norm(d8 - d1) / np.linalg.norm(d1)
            assert err < 0.1, f"step {s}: {p}'s update differs by {err:.1%} (L2) on 8 devices"
        np.testing.assert_allclose(after1.extra["pool_A"], after8.extra["pool_A"], atol=1e-5)


def test_steps_this_call_stops_at_every_event_step():
    cfg = _tiny_cyclegan(num_train_steps=20, log_every_steps=6, checkpoint_every_steps=8)
    cfg.steps_per_call = 4
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    step, calls = 0, []
    while step < 20:
        n = run.steps_this_call(step, 20)
        calls.append(n)
        step += n
        # Each log (6, 12, 18), checkpoint (8, 16) and the end (20) is a call's last step.
        assert not any(step - n < e < step for e in (6, 8, 12, 16, 18, 20)), (step, n)
    assert step == 20 and calls.count(4) >= 2


def test_several_steps_per_call_train_like_one(tmp_path, monkeypatch):
    """steps_per_call=2: one scanned program per two steps; the same training (logged losses)
    as one step per call, and a resume in the middle is bit-identical to no resume.

    The scanned program adds in another order than two separate steps, so the parameters
    differ in their last bits (and Adam moves the biases that only get float noise by +-lr
    either way): the losses are compared, the raw parameters are not.
    """
    mesh = parallel.make_mesh(8)
    one = trainer.train(_tiny_cyclegan(), str(tmp_path / "one"), mesh=mesh)
    calls = []
    run_steps = loop.Run.run_steps
    monkeypatch.setattr(
        loop.Run,
        "run_steps",
        lambda self, state, batches: calls.append(len(batches)) or run_steps(self, state, batches),
    )
    cfg = _tiny_cyclegan(steps_per_call=2)
    two = trainer.train(cfg, str(tmp_path / "two"), mesh=mesh)
    assert calls == [2, 2]  # runlocal: 4 steps, logs and checkpoints every 2
    half = trainer.train(cfg, str(tmp_path / "resumed"), max_steps=2, mesh=mesh)
    assert int(half.step) == 2
    resumed = trainer.train(cfg, str(tmp_path / "resumed"), mesh=mesh)
    for field in ("params", "opt_state", "extra", "rng"):
        assert equal_trees(getattr(two, field), getattr(resumed, field)), field
    assert int(one.step) == int(two.step) == 4

    def losses(workdir):
        with open(tmp_path / workdir / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return {r["step"]: (r["loss/G"], r["loss/D"]) for r in rows if "loss/G" in r}

    assert sorted(losses("two")) == sorted(losses("one")) == [2, 4]
    for s, v in losses("one").items():
        np.testing.assert_allclose(losses("two")[s], v, rtol=1e-3, err_msg=f"step {s}")


def test_without_baselines_the_method_trains_alike_and_the_baseline_stays_at_init():
    """config.train_baselines=False skips PixelDA's source-only phase: G, D and T train as
    with it (the other phases keep their RNG keys), T_src keeps its initial weights and
    optimizer state, and its eval metrics are dropped."""
    runs = {}
    for train_baselines in (True, False):
        cfg = load_config("pixelda", "runlocal")
        cfg.train_baselines = train_baselines
        run = loop.Run(cfg, mesh=parallel.make_mesh(1))
        state = run.init_state()
        init = jax.device_get((state.params, state.opt_state))
        for s in range(2):
            state, metrics = run.step_fn(state, run.global_batch(s))
        runs[train_baselines] = (run, init, jax.device_get(state), metrics)
    (_, init_on, on, m_on), (run_off, init_off, off, m_off) = runs[True], runs[False]
    assert equal_trees(init_on, init_off)
    assert "loss/source_only" in m_on and "loss/source_only" not in m_off
    names = ("source_only", "oracle")
    baseline = tuple(f"{p}{b}" for b in names for p in ("loss/", "guard/loss/", ""))
    assert {k for k in m_on if not k.startswith(baseline)} == set(m_off)
    for p in ("G", "D", "T"):
        assert equal_trees(on.params[p], off.params[p]), p
        assert equal_trees(on.opt_state.inner_states[p], off.opt_state.inner_states[p]), p
    assert equal_trees(off.params["T_src"], init_off[0]["T_src"])
    assert equal_trees(off.opt_state.inner_states["T_src"], init_off[1].inner_states["T_src"])
    assert not equal_trees(on.params["T_src"], init_on[0]["T_src"])  # it does train, when on

    scores = {
        "eval/target_accuracy": 0.9,
        "eval/source_only_accuracy": 0.5,
        "eval/adaptation_gain": 0.4,
    }
    assert engine.without_baseline_metrics(run_off.method, scores) == {"eval/target_accuracy": 0.9}
    assert engine.without_baseline_metrics(runs[True][0].method, scores) == scores


def test_the_target_oracle_trains_on_target_labels_and_never_touches_the_method():
    """PixelDA's target oracle (T's architecture on the target stream *with* labels): with
    it on or off, G, D, T and T_src train bit for bit alike (so no phase of the method reads
    the target labels); it trains only when on; its metrics and gap_closed are reported."""
    runs = {}
    for oracle in (True, False):
        cfg = load_config("pixelda", "runlocal")
        cfg.train_oracle = oracle
        run = loop.Run(cfg, mesh=parallel.make_mesh(1))
        assert ("target_labeled" in run.method.train_streams()) == oracle
        state = run.init_state()
        init = jax.device_get(state.params)
        for s in range(2):
            state, metrics = run.step_fn(state, run.global_batch(s))
        runs[oracle] = (run, init, jax.device_get(state), metrics)
    (run_on, init_on, on, m_on), (run_off, _, off, m_off) = runs[True], runs[False]
    batch = run_on.loader.batch(0)
    assert set(batch["target_labeled"]) == {"image", "label"} and set(batch["target"]) == {"image"}
    for p in ("G", "D", "T", "T_src"):
        assert equal_trees(on.params[p], off.params[p]), p
        assert equal_trees(on.opt_state.inner_states[p], off.opt_state.inner_states[p]), p
    assert not equal_trees(on.params["T_oracle"], init_on["T_oracle"])
    assert equal_trees(off.params["T_oracle"], init_on["T_oracle"])
    assert "loss/oracle" in m_on and "loss/oracle" not in m_off
    scores = run_on.method.evaluate(on, parallel.make_mesh(1))
    acc = scores["eval/oracle_accuracy"]
    assert 0.0 <= acc <= 1.0
    gap = acc - scores["eval/source_only_accuracy"]
    if gap > 1e-9:
        assert scores["eval/gap_closed"] == pytest.approx(scores["eval/adaptation_gain"] / gap)
    off_scores = engine.without_baseline_metrics(
        run_off.method, run_off.method.evaluate(off, parallel.make_mesh(1))
    )
    assert not [k for k in off_scores if k.startswith(engine.ORACLE_METRICS)]
    assert classify_eval.gap_closed(0.7, 0.4, 0.8) == {"eval/gap_closed": pytest.approx(0.75)}
    assert classify_eval.gap_closed(0.7, 0.4, 0.4) == {}


def test_the_moving_average_follows_the_formula_and_never_changes_training():
    """config.ema_decay: extra['ema'] starts at the initial weights and follows
    ema <- d ema + (1 - d) params, d = min(decay, (1 + step) / (10 + step)), for every player;
    the training itself (params, optimizer state) is bit-identical to a run without it, and
    eval_state puts the average in the parameters' place."""
    decay, runs = 0.3, {}
    for on in (True, False):
        cfg = load_config("pixelda", "runlocal")
        cfg.ema_decay = decay if on else 0.0
        run = loop.Run(cfg, mesh=parallel.make_mesh(1))
        state = run.init_state()
        trail = [jax.device_get(state)]
        for s in range(3):
            state, _ = run.step_fn(state, run.global_batch(s))
            trail.append(jax.device_get(state))
        runs[on] = trail
    on, off = runs[True], runs[False]
    assert engine.EMA not in off[-1].extra and engine.eval_state(off[-1]) is off[-1]
    expected = on[0].params
    assert equal_trees(on[0].extra[engine.EMA], expected)
    for s in range(1, 4):
        assert equal_trees(on[s].params, off[s].params) and equal_trees(
            on[s].opt_state, off[s].opt_state
        ), s
        d = min(decay, s / (9.0 + s))  # (1 + step) / (10 + step) with step = s - 1
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, on[s].params)
        got = on[s].extra[engine.EMA]
        assert set(got) == set(on[s].params)  # every player, the baselines' copies too
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not equal_trees(on[-1].extra[engine.EMA], on[-1].params)
    assert equal_trees(engine.eval_state(on[-1]).params, on[-1].extra[engine.EMA])


@pytest.mark.parametrize("name", ["pixelda", "cycada", "gta", "gta_seg", "ccgan"])
def test_baselines_are_phases_over_copies_trained_with_their_originals_blocks(name):
    cfg = load_config(name, "runlocal")
    if name == "cycada":
        cfg.stage = "feature"
    method = registry.get_method(cfg)
    assert method.baselines
    by_name = {ph.name: ph for ph in engine.phases(method)}
    players = engine.players(method)
    for b in method.baselines:
        assert by_name[b.name].players == tuple(b.copies), b.name
        for copy, orig in b.copies.items():
            assert copy not in method.players and players[copy] == method.players[orig]
        assert b.metrics
    assert [ph.name for ph in engine.phases(method)][: len(method.phases())] == [
        ph.name for ph in method.phases()
    ]


def test_a_baseline_phase_is_the_methods_supervised_loss_on_its_copies():
    """PixelDA's source-only phase: exactly ``supervised_loss`` with ``T_src`` in T's place,
    and its copies start from the originals' weights."""
    cfg = load_config("pixelda", "runlocal")
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    method, state = run.method, jax.device_get(run.init_state())
    assert equal_trees(state.params["T_src"], state.params["T"])
    assert equal_trees(state.params["T_oracle"], state.params["T"])
    batch = method.prepare(run.global_batch(0))
    inputs = engine.make_inputs(method, batch, state, jax.random.PRNGKey(3))
    params = {**state.params, "T_src": jax.tree.map(lambda x: x * 1.5, state.params["T"])}
    phase = {ph.name: ph for ph in engine.phases(method)}["source_only"]
    loss, out = phase.loss_fn(params, inputs)
    ref, ref_out = method.supervised_loss(
        {**params, "T": params["T_src"]}, inputs, batch["source"], batch["label"]
    )
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    assert set(out.metrics) == {f"source_only/{k}" for k in ref_out.metrics}
    assert not np.isclose(
        float(loss),
        float(method.supervised_loss(params, inputs, batch["source"], batch["label"])[0]),
    )


def test_train_without_baselines_reports_no_baseline_metrics(tmp_path):
    cfg = load_config("pixelda", "runlocal")
    cfg.train_baselines, cfg.num_train_steps = False, 2
    trainer.train(cfg, str(tmp_path), mesh=parallel.make_mesh(1))
    with open(tmp_path / "metrics.jsonl") as f:
        keys = set().union(*(json.loads(line) for line in f))
    assert {"eval/target_accuracy", "loss/GT", "loss/D"} <= keys, keys
    assert not [k for k in keys if "source_only" in k or "oracle" in k or "gain" in k], keys


def test_profile_steps_writes_a_trace_of_the_training_steps(tmp_path):
    cfg = load_config("pixelda", "runlocal")
    cfg.num_train_steps, cfg.profile_steps, cfg.profile_skip_steps = 3, 1, 1
    trainer.train(cfg, str(tmp_path), mesh=parallel.make_mesh(1))

    def found(pattern):
        return glob.glob(str(tmp_path / "profile" / "**" / pattern), recursive=True)

    assert found("*.xplane.pb"), "no TensorBoard profile"
    (perfetto,) = found("perfetto_trace.json.gz")
    with gzip.open(perfetto) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert any("train_step" in n for n in names)  # the jitted step ran inside the trace


def test_compilation_cache_dir_is_the_workdirs_unless_jax_has_one():
    cfg = load_config("pixelda", "runlocal")
    session = jax.config.jax_compilation_cache_dir  # conftest's (JAX_COMPILATION_CACHE_DIR)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert loop.compilation_cache_dir(cfg, "/w") == "/w/compilation_cache"
        cfg.compilation_cache_dir = "/elsewhere"
        assert loop.compilation_cache_dir(cfg, "/w") == "/elsewhere"
        cfg.compilation_cache_dir = ""
        assert loop.compilation_cache_dir(cfg, "/w") is None
        jax.config.update("jax_compilation_cache_dir", "/set/by/user")
        cfg.compilation_cache_dir = "auto"  # JAX reads its directory once: the one it has
        assert loop.compilation_cache_dir(cfg, "/w") == "/set/by/user"
    finally:
        jax.config.update("jax_compilation_cache_dir", session)
