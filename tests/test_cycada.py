"""CyCADA: the three stages trained in order with warm starts and an interrupted-stage resume,
phase isolation in every stage, each loss against numpy, networks, configs, segmentation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import equal_trees, load_config

from ganda_jax import engine
from ganda_jax.methods import cycada
from ganda_jax.train import parallel, resume, trainer

STEPS = {"pretrain": 24, "pixel": 4, "feature": 4}
STOP = 3  # the first run stops inside the pretrain stage


@pytest.fixture(scope="module", autouse=True)
def _fast_random_compiles():
    # jax's partitionable threefry makes XLA:CPU compile every random initializer for
    # seconds (about 7x slower here); the other threefry variant draws different numbers
    # but behaves the same, and keeps this file's compilations short.
    with jax.threefry_partitionable(False):
        yield


def _tiny_config(variant=None):
    cfg = load_config("cycada", "runlocal" + (f",{variant}" if variant else ""))
    for stage, n in STEPS.items():
        cfg.stage_steps[stage] = n
    # Smaller graphs compile faster: no residual block, a 1-layer PatchGAN, 2 conv layers
    # (dropout only before the last layer), checkpoints only at the end or an interruption.
    cfg.model.n_blocks, cfg.model.n_layers_D = 0, 1
    cfg.model.t_features, cfg.model.t_conv_dropout = (4, 8), (0.0, 0.0)
    cfg.checkpoint_every_steps = 100
    # Weights away from 1, so the hand computations can tell the terms apart.
    cfg.loss.lambda_A, cfg.loss.lambda_B = 3.0, 5.0
    cfg.loss.semantic_weight, cfg.loss.adv_weight_st = 0.7, 2.0
    cfg.loss.task_weight, cfg.loss.feature_weight = 0.6, 0.3
    cfg.optimizer.f_S.learning_rate = 3e-3
    return cfg


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _np_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    logits = logits.reshape(-1, logits.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    m = logits.max(-1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), labels].mean()


def _softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """``stage='all'`` interrupted inside the pretrain stage, then re-run to the end."""
    cfg, wd, mesh = _tiny_config(), tmp_path_factory.mktemp("cycada"), parallel.make_mesh(2)
    calls = []

    def spy(warm_start):
        def wrapped(self, state, restore):
            calls.append(self.stage)
            return warm_start(self, state, restore)

        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        for cls in cycada.STAGE_METHODS.values():
            mp.setattr(cls, "warm_start", spy(cls.warm_start))
        trainer.train(cfg, str(wd), max_steps=STOP, mesh=mesh)
        first = {
            "calls": list(calls),
            "dirs": sorted(p.name for p in wd.iterdir()),
            "pretrain_steps": [line["step"] for line in _lines(wd / "pretrain" / "metrics.jsonl")],
        }
        calls.clear()
        final = trainer.train(cfg, str(wd), mesh=mesh)
    sharding = parallel.replicated(mesh)
    states = {
        s: resume.restore_latest(c, str(wd / s), sharding)
        for s, c in cycada.CyCADA.stage_configs(cfg, str(wd))
    }
    return {"cfg": cfg, "wd": wd, "first": first, "calls": calls, "final": final, "states": states}


def test_stages_run_in_order_resume_and_warm_start_only_fresh_runs(staged):
    wd, first = staged["wd"], staged["first"]
    # First run: pretrain stopped at step 3 (with a checkpoint); no later stage started.
    assert first["dirs"] == ["pretrain"] and first["pretrain_steps"] == [1, 2, 3]
    assert first["calls"] == ["pretrain"]
    # Re-run: pretrain resumed at step 4 (the warm-start hook runs on fresh inits only, never
    # over a resumed state), then pixel and feature started fresh from the earlier stages.
    assert staged["calls"] == ["pixel", "feature"]
    pretrain = _lines(wd / "pretrain" / "metrics.jsonl")
    assert [line["step"] for line in pretrain if "loss/f_S" in line] == list(range(1, 25))
    pixel = _lines(wd / "pixel" / "metrics.jsonl")
    assert int(staged["final"].step) == STEPS["feature"]
    for stage, n in STEPS.items():
        assert staged["states"][stage].step == n
        assert json.loads((wd / stage / "config.json").read_text())["stage"] == stage
    evals = [
        line for line in _lines(wd / "feature" / "metrics.jsonl") if "eval/target_accuracy" in line
    ]
    assert evals and evals[-1]["step"] == STEPS["feature"]
    for k in (
        "eval/target_accuracy",
        "eval/pixel_only_accuracy",
        "eval/source_only_accuracy",
        "eval/pretrained_source_only_accuracy",
        "eval/source_accuracy",
        "eval/source_only_source_accuracy",
        "eval/oracle_accuracy",
    ):
        assert 0.0 <= evals[-1][k] <= 1.0, k
    ev = evals[-1]
    assert ev["eval/adaptation_gain"] == pytest.approx(
        ev["eval/target_accuracy"] - ev["eval/source_only_accuracy"]
    )
    if ev["eval/oracle_accuracy"] > ev["eval/source_only_accuracy"]:
        assert ev["eval/gap_closed"] == pytest.approx(
            ev["eval/adaptation_gain"]
            / (ev["eval/oracle_accuracy"] - ev["eval/source_only_accuracy"])
        )
    assert "eval/target_to_source_accuracy" in pixel[-1]
    assert "eval/source_only_accuracy" in _lines(wd / "pretrain" / "metrics.jsonl")[-1]
    assert list((wd / "pixel" / "samples").iterdir())
    assert list((wd / "feature" / "samples").iterdir())


def test_later_stages_start_from_the_earlier_final_checkpoints(staged):
    pre, pix, feat = (staged["states"][s] for s in ("pretrain", "pixel", "feature"))
    f_s = {"params": pre.params["f_S"], **pre.model_state["f_S"]}
    # The frozen networks are the earlier stages' final ones, and stay bit-identical.
    assert equal_trees(pix.extra["f_S"], f_s)
    assert equal_trees(feat.extra["f_S"], f_s)
    assert equal_trees(feat.extra["G_st"], pix.params["G_st"])
    # f_T and both baselines started from f_S: after 4 Adam steps of lr 1e-4 they are within
    # 4e-4 of it (a fresh init would be ~0.1 away).
    for p in ("f_T", "T_pix", "T_src", "f_T_oracle"):
        diffs = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), feat.params[p], pre.params["f_S"])
        assert 0 < max(jax.tree.leaves(diffs)) < 1e-3, p
        assert not equal_trees(feat.model_state[p], pre.model_state["f_S"])  # BN stats moved


def _inputs(method, state, step=1):
    """Phase inputs on training examples ``step * batch_size ...`` of each stream."""
    n = method.config.batch_size
    batch = {
        k: {f: np.stack([src[(step * n + i) % len(src)][f] for i in range(n)]) for f in src.fields}
        for k, src in method.train_streams().items()
    }
    return engine.make_inputs(method, method.prepare(batch), state, jax.random.PRNGKey(step))


def test_phases_write_only_their_own_statistics_and_buffers(staged):
    expected = {
        "f_S": ({"f_S"}, set()),
        "G": (set(), set()),
        "D": (set(), {"pool_A", "pool_B", "pool_count_A", "pool_count_B"}),
        "D_feat": (set(), set()),
        "f_T": ({"f_T"}, set()),
        "pixel_only": ({"T_pix"}, set()),
        "source_only": ({"T_src"}, set()),
        "oracle": ({"f_T_oracle"}, set()),
    }
    for stage, cfg in cycada.CyCADA.stage_configs(staged["cfg"], str(staged["wd"])):
        method = cycada.CyCADA(cfg)
        state = staged["states"][stage]
        inp = _inputs(method, state)
        for ph in engine.phases(method):
            _, aux = jax.eval_shape(ph.loss_fn, state.params, inp)
            got = (set(aux.model_state), set(aux.extra))
            assert got == expected[ph.name], (stage, ph.name, got)
            inp = inp._replace(carry={**inp.carry, **aux.carry})


def _phase_losses(method, state, inputs, extra_fn):
    """Every phase's loss from the same state (carry as in a real step), jitted once together
    with ``extra_fn(params, inputs)``: the values the hand computations need."""
    phases = engine.phases(method)

    @jax.jit
    def run(params, inputs):
        losses, carry = {}, {}
        for ph in phases:
            loss, aux = ph.loss_fn(params, inputs._replace(carry=carry))
            losses[ph.name] = (loss, aux.metrics, aux.carry)
            carry = {**carry, **jax.lax.stop_gradient(aux.carry)}
        return losses, extra_fn(params, inputs)

    return run(state.params, inputs)


def test_pixel_losses_match_numpy(staged):
    cfg = cycada.stage_config(staged["cfg"], "pixel")
    m, state = cycada.CyCADA(cfg), staged["states"]["pixel"]
    inp = _inputs(m, state, step=3)

    def intermediates(p, inp):
        f_s, b, G = inp.extra["f_S"], inp.batch, m.translate
        D = lambda name, x: m.cyclegan.D.apply({"params": p[name]}, x)
        f = lambda x: m.task_apply(f_s, x, train=False)[0]
        fake_t, fake_s = G(p["G_st"], b["source"]), G(p["G_ts"], b["target"])
        return {
            "fake_t": fake_t,
            "rec_s": G(p["G_ts"], fake_t),
            "rec_t": G(p["G_st"], fake_s),
            "d_t": D("D_t", fake_t),
            "d_s": D("D_s", fake_s),
            "f_x_s": f(b["source"]),
            "f_x_t": f(b["target"]),
            "f_fake_t": f(fake_t),
            "f_fake_s": f(fake_s),
        }

    phase_losses, o = _phase_losses(m, state, inp, intermediates)

    # The G phase's loss (the test config's weights: lambda_A 3, lambda_B 5, semantic 0.7,
    # G_st adversarial x2), each term from the networks' outputs in numpy.
    loss, met, carry = phase_losses["G"]
    o = jax.tree.map(lambda x: np.asarray(x, np.float64), o)
    x_s, x_t = np.asarray(inp.batch["source"]), np.asarray(inp.batch["target"])
    adv_st, adv_ts = np.mean((o["d_t"] - 1) ** 2), np.mean((o["d_s"] - 1) ** 2)  # LSGAN
    cyc_s, cyc_t = np.mean(np.abs(o["rec_s"] - x_s)), np.mean(np.abs(o["rec_t"] - x_t))
    sem_st = _np_ce(o["f_fake_t"], o["f_x_s"].argmax(-1))  # p(f_S, x_s): the paper's labels
    sem_ts = _np_ce(o["f_fake_s"], o["f_x_t"].argmax(-1))
    np.testing.assert_allclose(met["G/sem_st"], sem_st, rtol=1e-4)
    np.testing.assert_allclose(met["G/sem_ts"], sem_ts, rtol=1e-4)
    expected = 2.0 * adv_st + adv_ts + 3.0 * cyc_s + 5.0 * cyc_t + 0.7 * (sem_st + sem_ts)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    # The D phase gets the generator's fakes (made before its update) through the carry.
    np.testing.assert_allclose(carry["fake_B"], o["fake_t"], atol=1e-6)
    loss_d, met_d, _ = phase_losses["D"]
    np.testing.assert_allclose(float(loss_d), float(met_d["D_s/adv"] + met_d["D_t/adv"]))


def test_feature_losses_match_numpy(staged):
    cfg = cycada.stage_config(staged["cfg"], "feature")
    m, state = cycada.CyCADA(cfg), staged["states"]["feature"]
    inp = _inputs(m, state, step=5)

    def intermediates(params, inp):
        x_st = m.translate(inp.extra["G_st"], inp.batch["source"])
        x = jnp.concatenate([x_st, inp.batch["target"]])
        vars_ = lambda p: m.player_vars(params, inp.model_state, p)
        logits = m.task_apply(vars_("f_T"), x, train=True, rng=inp.rng)[0]
        return {
            "x_st": x_st,
            "logits": logits,
            "d": m.D_feat.apply({"params": params["D_feat"]}, logits),  # phi = logits
            "pix_logits": m.task_apply(vars_("T_pix"), x_st, train=True, rng=inp.rng)[0],
            "src_logits": m.task_apply(
                vars_("T_src"), inp.batch["source"], train=True, rng=inp.rng
            )[0],
            "oracle_logits": m.task_apply(
                vars_("f_T_oracle"), inp.batch["oracle_image"], train=True, rng=inp.rng
            )[0],
        }

    phase_losses, o = _phase_losses(m, state, inp, intermediates)

    o = jax.tree.map(lambda x: np.asarray(x, np.float64), o)
    y, n = np.asarray(inp.batch["label"]), len(inp.batch["label"])
    d_s, d_t = o["d"][:n], o["d"][n:]
    # D_feat: translated source is 'real', target 'fake' (log loss on one logit).
    np.testing.assert_allclose(
        phase_losses["D_feat"][0], _softplus(-d_s).mean() + _softplus(d_t).mean(), rtol=1e-5
    )
    # f_T (test config: task weight 0.6, feature weight 0.3; the non-saturating G loss).
    expected = 0.6 * _np_ce(o["logits"][:n], y) + 0.3 * _softplus(-d_t).mean()
    np.testing.assert_allclose(phase_losses["f_T"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(phase_losses["pixel_only"][0], _np_ce(o["pix_logits"], y), rtol=1e-5)
    np.testing.assert_allclose(
        phase_losses["source_only"][0], _np_ce(o["src_logits"], y), rtol=1e-5
    )
    # The oracle: the same CE on labelled *target* training images (only its phase reads them).
    y_t = np.asarray(inp.batch["oracle_label"])
    np.testing.assert_allclose(
        phase_losses["oracle"][0], _np_ce(o["oracle_logits"], y_t), rtol=1e-5
    )
    assert np.abs(o["x_st"] - np.asarray(inp.batch["source"])).max() > 0  # really translated


def test_pretrain_loss_takes_logits(staged):
    m = cycada.CyCADA(cycada.stage_config(staged["cfg"], "pretrain"))
    pre = staged["states"]["pretrain"]
    params = dict(pre.params)
    # Large logits: a true CE far above log(1 + 9e) = 3.24, the most a softmax fed to a
    # cross-entropy (a known reference-code bug) could give with 10 classes.
    last = max(k for k in params["f_S"] if k.startswith("Dense"))
    params["f_S"] = {**params["f_S"], last: jax.tree.map(lambda w: 50.0 * w, params["f_S"][last])}
    inp = _inputs(m, pre)

    @jax.jit
    def forward(params, inp):
        v = m.player_vars(params, inp.model_state, "f_S")
        logits = m.task_apply(v, inp.batch["source"], train=True, rng=inp.rng)[0]
        return logits, m.pretrain_loss(params, inp)[0]

    logits, loss = forward(params, inp)
    np.testing.assert_allclose(float(loss), _np_ce(logits, inp.batch["label"]), rtol=1e-5)
    assert float(loss) > 3.3


def test_every_loss_moves_and_stays_finite(staged):
    wd = staged["wd"]
    keys = {
        "pretrain": ["loss/f_S", "f_S/ce"],
        "pixel": ["loss/G", "loss/D", "G_st/adv", "G/cycle_s", "G/sem_st", "G/sem_ts", "D_t/adv"],
        "feature": [
            "loss/D_feat",
            "loss/f_T",
            "loss/pixel_only",
            "loss/source_only",
            "f_T/adv",
            "f_T/ce",
        ],
    }
    for stage, ks in keys.items():
        lines = [
            line for line in _lines(wd / stage / "metrics.jsonl") if "perf/steps_per_sec" in line
        ]
        assert len(lines) == STEPS[stage]
        assert all(np.isfinite(v) for line in lines for v in line.values())
        for k in ks:
            assert np.std([line[k] for line in lines]) > 1e-6, (stage, k)
    ce = [line["f_S/ce"] for line in _lines(wd / "pretrain" / "metrics.jsonl") if "f_S/ce" in line]
    assert np.mean(ce[-6:]) < np.mean(ce[:6])  # the source classifier learns


def test_networks():
    x = jnp.zeros((2, 32, 32, 3))
    init = lambda net, *a: jax.eval_shape(
        lambda k: net.init({"params": k, "dropout": k}, *a, train=False), jax.random.PRNGKey(0)
    )
    # The reference's DTN (SVHN->MNIST): 3,133,962 parameters (convs 4,864 + 204,928 +
    # 819,456, fc 2,097,664 + 5,130, BatchNorm scales and shifts 128 + 256 + 512 + 1,024).
    dtn = cycada.TaskNet()
    v = init(dtn, x)
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(v["params"])) == 3_133_962
    logits, feat = jax.eval_shape(lambda v: dtn.apply(v, x, train=False), v)
    assert logits.shape == (2, 10) and feat.shape == (2, 512) and logits.dtype == jnp.float32
    segnet = cycada.SegNet(features=(4, 8, 8), num_classes=5)
    v = init(segnet, x)
    logits, score = jax.eval_shape(lambda v: segnet.apply(v, x, train=False), v)
    assert logits.shape == (2, 32, 32, 5) and score.shape == (2, 8, 8, 5)
    d = cycada.FeatureDiscriminator(hidden=(500, 500))
    shapes = jax.eval_shape(d.init, jax.random.PRNGKey(0), jnp.zeros((2, 10)))
    # The reference's ADDA discriminator 10-500-500 (+ one logit instead of two).
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)) == 5_500 + 250_500 + 501
    out = jax.eval_shape(d.apply, jax.eval_shape(d.init, jax.random.PRNGKey(0), score), score)
    assert out.shape == (2, 8, 8, 1)  # per position of a score map


def test_configs_and_errors(tmp_path):
    cfg = load_config("cycada")
    assert cfg.stage == "all" and cfg.task == "classify"
    assert cfg.num_train_steps == sum(cfg.stage_steps.values())
    cfg.stage_steps.pixel = 7  # num_train_steps follows the stages
    assert cfg.num_train_steps == sum(cfg.stage_steps.values())
    plan = cycada.CyCADA.stage_configs(cfg, str(tmp_path))
    assert [s for s, _ in plan] == list(cycada.STAGES)
    pix = dict(plan)["pixel"]
    assert pix.num_train_steps == 7 and pix.pretrain_workdir == str(tmp_path / "pretrain")
    cfg.num_train_steps = 5
    with pytest.raises(ValueError, match="stage_steps"):
        cycada.CyCADA.stage_configs(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="one stage"):
        cycada.CyCADA(load_config("cycada", "runlocal"))
    paper = load_config("cycada", "paper")
    assert paper.model.t_features == (64, 128, 256) and paper.loss.lambda_A == 1.0
    assert cycada.stage_config(paper, "pixel").batch_size == 100
    assert load_config("cycada", "svhn_mnist").data.source_domain.name == "svhn_cropped"
    assert load_config("cycada", "seg").task == "segment"
    with pytest.raises(ValueError, match="unknown config variant"):
        load_config("cycada", "papr")
    # A missing warm-start checkpoint is a one-line error naming the directory.
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*nothing") as err:
        resume.restore_latest(
            cycada.stage_config(cfg, "pretrain"),
            str(tmp_path / "nothing"),
            parallel.replicated(parallel.make_mesh(1)),
        )
    assert "\n" not in str(err.value)


def _random_state(method, seed=0):
    """A TrainState with numpy-random parameters (no jitted init to compile)."""
    shapes = jax.eval_shape(
        method.init, jax.random.PRNGKey(0), method.prepare(method.example_batch(2))
    )
    rng = np.random.default_rng(seed)
    params, model_state, extra = jax.tree.map(
        lambda s: (
            (0.2 * rng.standard_normal(s.shape)).astype(s.dtype)
            if jnp.issubdtype(s.dtype, jnp.floating)
            else np.zeros(s.shape, s.dtype)
        ),
        shapes,
    )
    # BatchNorm variances (in model_state, and f_S's in extra) stay positive.
    model_state, extra = jax.tree.map(np.abs, (model_state, extra))
    params, model_state = engine.with_copies(method, params, model_state)
    return engine.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=None,
        model_state=model_state,
        extra=extra,
        rng=jax.random.PRNGKey(0),
    )


def test_segmentation_variant_losses_and_miou():
    cfg = _tiny_config("seg")
    cfg.image_size, cfg.model.t_features = 16, (4, 8, 8)
    cfg.loss.semantic_source_labels = "ground_truth"  # the reference's form, with void pixels
    pix_m = cycada.CyCADA(cycada.stage_config(cfg, "pixel"))
    feat_m = cycada.CyCADA(cycada.stage_config(cfg, "feature"))
    pix, feat = _random_state(pix_m), _random_state(feat_m, seed=1)

    @jax.jit
    def forward(pix, feat, inp_pix, inp_feat):
        f_s = inp_pix.extra["f_S"]
        fake_t = pix_m.translate(pix.params["G_st"], inp_pix.batch["source"])
        f = lambda x: pix_m.task_apply(f_s, x, train=False)[0]
        return (
            f(inp_pix.batch["source"]),
            f(fake_t),
            pix_m.pixel_generator_loss(pix.params, inp_pix),
            feat_m.feature_task_loss(feat.params, inp_feat),
        )

    inp_pix, inp_feat = _inputs(pix_m, pix), _inputs(feat_m, feat)
    labels = np.array(inp_pix.batch["label"])
    assert labels.shape == (4, 16, 16)  # per-pixel class maps
    labels[:, :5] = 255  # void rows: no loss may count them
    inp_pix = inp_pix._replace(batch={**inp_pix.batch, "label": jnp.asarray(labels)})
    f_x_s, f_fake_t, (loss, aux), (loss_t, aux_t) = forward(pix, feat, inp_pix, inp_feat)
    assert f_x_s.shape == (4, 16, 16, 5)
    # The source semantic term: a per-pixel CE against the true labels, void pixels left out.
    np.testing.assert_allclose(
        aux.metrics["G/sem_st"], _np_ce(np.asarray(f_fake_t)[:, 5:], labels[:, 5:]), rtol=1e-4
    )
    assert np.isfinite(float(loss)) and np.isfinite(float(loss_t))
    assert set(aux_t.model_state) == {"f_T"}

    scores = feat_m.evaluate(feat, parallel.make_mesh(2))
    for k in ("eval/miou", "eval/source_only_miou", "eval/pixel_only_miou", "eval/source_miou"):
        assert 0.0 <= scores[k] <= 1.0, k
    assert scores["eval/adaptation_gain"] == pytest.approx(
        scores["eval/miou"] - scores["eval/source_only_miou"]
    )
    assert feat_m.data.test_split("target")["label"].shape == (16, 16, 16)
