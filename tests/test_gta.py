"""GTA: network shapes, every phase loss against numpy, phase isolation, and a tiny training run
through trainer.train that is interrupted, resumed, evaluated and sampled."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import equal_trees, load_config

from ganda_jax import engine
from ganda_jax.methods import gta
from ganda_jax.train import loop, parallel, trainer

STEPS = 20
EVAL_KEYS = (
    "eval/target_accuracy",
    "eval/source_only_accuracy",
    "eval/adaptation_gain",
    "eval/source_accuracy",
    "eval/source_only_source_accuracy",
)


def _config():
    cfg = load_config("gta", "runlocal")
    cfg.batch_size = 32  # the whole runlocal training set: smooth full-batch loss curves
    cfg.num_train_steps = STEPS
    cfg.log_every_steps = 1
    cfg.checkpoint_every_steps = 4
    # Not the defaults (0.1, 0.3), so the loss test can tell the two weights apart.
    cfg.loss.adv_weight, cfg.loss.target_adv_factor = 0.5, 0.2
    # A fast F and C: at width 4 with N(0, 0.02) convs the source task needs a push to start.
    for name, group in cfg.optimizer.items():
        group.learning_rate = 5e-3 if name in ("F", "C") else 2e-3
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trainer.train stopped at step 0 (a checkpoint of the fresh state), then resumed from that
    checkpoint to STEPS in the same workdir. (A bit-identical resume mid-run is the engine's
    test; one step compilation here keeps this file fast.)"""
    cfg, workdir = _config(), tmp_path_factory.mktemp("gta")
    mesh = parallel.make_mesh(2)
    fresh = jax.device_get(trainer.train(cfg, str(workdir), max_steps=0, mesh=mesh))
    final = jax.device_get(trainer.train(cfg, str(workdir), mesh=mesh))
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"workdir": workdir, "fresh": fresh, "final": final, "lines": lines}


@pytest.fixture(scope="module")
def batch():
    run = loop.Run(_config(), mesh=parallel.make_mesh(1))
    try:
        return jax.device_get(run.method.prepare(run.global_batch(5)))
    finally:
        run.loader.close()


def _inputs(method, state, batch, carry=None):
    return engine.make_inputs(method, batch, state, jax.random.PRNGKey(7), carry)


# --- numpy references ----------------------------------------------------------------------


def _np(x):
    return np.asarray(x, np.float64)


def _bce(logits, label):
    """-[y log s(l) + (1 - y) log(1 - s(l))], mean."""
    p = 1.0 / (1.0 + np.exp(-_np(logits)))
    return float(-np.mean(label * np.log(p) + (1 - label) * np.log(1 - p)))


def _ce(logits, labels):
    logits = _np(logits)
    m = logits.max(-1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(-log_softmax[np.arange(len(labels)), labels].mean())


# --- tests -----------------------------------------------------------------------------------


def test_network_shapes_and_parameter_counts(batch):
    # Shapes only (jax.eval_shape: traced, never compiled).
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    f, c = gta.FeatureNet(ndf=4), gta.Classifier(hidden=8)
    g, d = gta.Generator(ngf=4), gta.Discriminator(ndf=4)
    method = gta.GTA(_config())

    def forward(x):
        emb = f.apply(f.init(key, x), x)
        logits = c.apply(c.init(key, emb), emb)
        code = method.code(jnp.zeros((2, 5)), emb, method.unknown(2))
        img, _ = g.apply(g.init(key, code, train=False), code, train=True, mutable=["batch_stats"])
        (data, cls), _ = d.apply(
            d.init(key, x, train=False), x, train=True, mutable=["batch_stats"]
        )
        return emb, logits, code, img, data, cls

    emb, logits, code, img, data, cls = jax.eval_shape(forward, x)
    assert emb.shape == (2, 8)  # 1x1x(2 ndf) after the three valid 5x5 convs
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert code.shape == (2, 11 + 8 + 5)  # [one-hot with "unknown", F(x), z]
    assert img.shape == (2, 32, 32, 3) and img.dtype == jnp.float32
    assert data.shape == (2,) and cls.shape == (2, 10) and data.dtype == jnp.float32
    _, model_state, _ = jax.eval_shape(method.init, key, batch)
    assert set(model_state) == {"G", "D"}

    # The reference's digit networks (ndf = ngf = 64, nz = 512, 10 classes), here with RGB input.
    def count(module, *args, **kw):
        init = functools.partial(module.init, **kw)
        shapes = jax.eval_shape(init, key, *args)["params"]
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))

    f_convs = (3 * 25 + 1) * 64 + (64 * 25 + 1) * 64 + (64 * 25 + 1) * 128
    assert count(gta.FeatureNet(ndf=64), x) == f_convs
    assert count(gta.Classifier(hidden=128), jnp.zeros((1, 128))) == 129 * 128 + 129 * 10
    bn = 2 * (512 + 256 + 128 + 64)
    g_convs = (11 + 128 + 512) * 512 * 4 + (512 * 256 + 256 * 128 + 128 * 64 + 64 * 3) * 16
    assert count(gta.Generator(ngf=64), jnp.zeros((1, 651)), train=False) == g_convs + bn
    d_convs = (3 * 64 + 64 * 128 + 128 * 256 + 256 * 128) * 9 + 64 + 128 + 256 + 128
    d_bn = 2 * (64 + 128 + 256 + 128)
    assert count(gta.Discriminator(ndf=64), x, train=False) == d_convs + d_bn + 129 + 1290


@pytest.fixture(scope="module")
def phases_out(trained, batch):
    """Every phase's loss once from the trained state, plus the networks' raw
    outputs computed by hand with module.apply; one compilation."""
    method = gta.GTA(_config())
    state = trained["final"]
    params = dict(state.params)
    # Large logits (a +30 bias on the class rarest in the batch): a true CE far above
    # log(1 + 9e) = 3.24, the most a softmax fed to a cross-entropy could ever give with 10 classes.
    last = max(k for k in params["C"] if k.startswith("Dense"))
    rare = int(np.argmin(np.bincount(batch["label"], minlength=10)))
    bias = params["C"][last]["bias"] + 30.0 * np.eye(10, dtype=np.float32)[rare]
    params["C"] = {**params["C"], last: {**params["C"][last], "bias": bias}}

    @jax.jit
    def run(params):
        out, carry = {}, {}
        for phase in engine.phases(method):  # each from the same state and the same noise
            inp = _inputs(method, state, batch, carry)

            value, aux = phase.loss_fn(params, inp)
            carry = {**carry, **aux.carry}
            out[phase.name] = {
                "loss": value,
                "carry": aux.carry,
                "draws": inp.draws,
                "model_state": aux.model_state,
            }

        # The networks' raw outputs, by hand.
        ms = state.model_state
        emb_s = method.F.apply({"params": params["F"]}, batch["source"])
        emb_t = method.F.apply({"params": params["F"]}, batch["target"])
        n = len(batch["label"])
        onehot_s = jax.nn.one_hot(batch["label"], 11)
        onehot_t = jnp.zeros((n, 11)).at[:, 10].set(1.0)  # "unknown"

        def g(code):
            v = {"params": params["G"], **ms["G"]}
            return method.G.apply(v, code, train=True, mutable=["batch_stats"])[0]

        def d(x):
            v = {"params": params["D"], **ms["D"]}
            return method.D.apply(v, x, train=True, mutable=["batch_stats"])[0]

        z = _inputs(method, state, batch).draws
        gen_s = g(jnp.concatenate([onehot_s, emb_s, z["z_s"]], -1))
        gen_t = g(jnp.concatenate([onehot_t, emb_t, z["z_t"]], -1))
        raw = {"gen_s": gen_s, "c_logits": method.C.apply({"params": params["C"]}, emb_s)}
        raw["real"], raw["real_cls"] = d(batch["source"])
        raw["fake_s"], raw["fake_s_cls"] = d(gen_s)
        raw["fake_t"], _ = d(gen_t)
        raw["code_t"] = method.code(z["z_t"], emb_t, method.unknown(n))
        return out, raw

    out, raw = jax.device_get(run(params))
    return {"method": method, "state": state, "params": params, "out": out, "raw": raw}


def test_every_loss_matches_numpy(phases_out, batch):
    out, o, y = phases_out["out"], phases_out["raw"], batch["label"]
    assert all(not out[ph]["carry"] for ph in out)  # no network outputs pass between phases
    z = out["D"]["draws"]  # only this step's noise, the same for every phase
    assert set(z) == {"z_s", "z_t"} and all(equal_trees(out[ph]["draws"], z) for ph in out)
    assert z["z_s"].shape == (len(y), 8) and not np.allclose(z["z_s"], z["z_t"])
    assert np.all(o["code_t"][:, 10] == 1) and np.all(o["code_t"][:, :10] == 0)
    assert float(np.max(np.abs(o["gen_s"]))) <= 1.0  # tanh

    expected_d = (
        _bce(o["real"], 1) + _ce(o["real_cls"], y) + _bce(o["fake_s"], 0) + _bce(o["fake_t"], 0)
    )
    np.testing.assert_allclose(out["D"]["loss"], expected_d, rtol=1e-4)
    expected_g = _bce(o["fake_s"], 1) + _ce(o["fake_s_cls"], y)
    np.testing.assert_allclose(out["G"]["loss"], expected_g, rtol=1e-4)
    ce = _ce(o["c_logits"], y)
    assert ce > 3.3
    np.testing.assert_allclose(out["C"]["loss"], ce, rtol=1e-4)
    # a = 0.5, b = 0.2 (see _config).
    expected_f = ce + 0.5 * _ce(o["fake_s_cls"], y) + 0.5 * 0.2 * _bce(o["fake_t"], 1)
    np.testing.assert_allclose(out["F"]["loss"], expected_f, rtol=1e-4)


def test_phases_follow_the_papers_order(phases_out):
    """The order of updates (phase isolation, finite losses and resume are checked for every
    method in ``test_methods.py``)."""
    assert [(p.name, p.players) for p in engine.phases(phases_out["method"])] == [
        ("D", ("D",)),
        ("G", ("G",)),
        ("C", ("C",)),
        ("F", ("F",)),
        ("source_only", ("F_src", "C_src")),
        ("oracle", ("F_oracle", "C_oracle")),
    ]


def test_training_resumes_moves_every_loss_and_evaluates(trained):
    lines, workdir = trained["lines"], trained["workdir"]
    steps = [x["step"] for x in lines if "loss/D" in x]
    # Stopped at step 0 and resumed there: every step logged exactly once.
    assert steps == list(range(1, STEPS + 1))
    assert int(trained["fresh"].step) == 0 and int(trained["final"].step) == STEPS
    ms = [x for x in lines if "loss/D" in x]
    assert all(np.isfinite(v) for m in ms for k, v in m.items() if isinstance(v, float))
    for k in ("loss/D", "loss/G", "loss/C", "loss/F", "loss/source_only", "F/adv_tgt", "F/cls_src"):
        assert np.std([m[k] for m in ms]) > 1e-4, k
    for k in ("C/source_ce", "source_only/ce", "D/cls_real"):  # the source task is learnt
        assert np.mean([m[k] for m in ms[-5:]]) < np.mean([m[k] for m in ms[:5]]), k
    # The baseline starts from the adapted networks' initial weights; training separates them.
    fresh = trained["fresh"].params
    assert equal_trees(fresh["F"], fresh["F_src"]) and equal_trees(fresh["C"], fresh["C_src"])
    final = trained["final"].params
    assert not equal_trees(final["F"], final["F_src"])

    evals = [x for x in lines if "eval/target_accuracy" in x]
    assert [e["step"] for e in evals] == [STEPS]
    for k in EVAL_KEYS:
        assert -1.0 <= evals[-1][k] <= 1.0, k
    assert evals[-1]["eval/adaptation_gain"] == pytest.approx(
        evals[-1]["eval/target_accuracy"] - evals[-1]["eval/source_only_accuracy"]
    )
    assert any(str(STEPS) == p.name for p in (workdir / "checkpoints").iterdir())
    names = {p.name for p in (workdir / "samples").rglob("*") if p.is_file()}
    assert any("generated_per_class" in n for n in names), names
    assert any("target_generated" in n for n in names), names
