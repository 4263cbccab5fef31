"""GTA (Sankaranarayanan, Balaji, Castillo, Chellappa 2018): Generate To Adapt.

An embedding ``F`` and a classifier ``C`` are trained on labelled source images;
a conditional GAN (``G``, ``D``) learns to generate *source-like* images from
the embedding, and ``F`` is trained so that target embeddings also generate
realistic source images. That pulls the target embeddings onto the source
manifold, where ``C`` works. Players and their losses, as the reference code's
trainer.py computes them (the paper's own equations and weights were not checked
here, only the reference; ``y`` is the one-hot
class with ``N + 1`` entries, the last one meaning "unknown", used for every
target image; ``z ~ N(0, I)``; ``D = (D_data, D_cls)`` is one network with a
real/fake logit and ``N`` class logits):

    L_D = BCE(D_data(x_s), 1) + CE(D_cls(x_s), y_s)
          + BCE(D_data(G(z, F(x_s), y_s)), 0) + BCE(D_data(G(z', F(x_t), y_unk)), 0)
    L_G = BCE(D_data(G(z, F(x_s), y_s)), 1) + CE(D_cls(G(z, F(x_s), y_s)), y_s)
    L_C = CE(C(F(x_s)), y_s)
    L_F = CE(C(F(x_s)), y_s)
          + a     CE(D_cls(G(z, F(x_s), y_s)), y_s)
          + a b   BCE(D_data(G(z', F(x_t), y_unk)), 1)

``D`` learns real *source* images against generated ones (from either domain)
and the source classes; ``G`` makes class-consistent source-like images; ``F``
gets the classifier's gradient, the auxiliary-classifier gradient through
``G`` on source, and the adversarial gradient through ``G`` on target.
``a = loss.adv_weight = 0.1`` and ``b = loss.target_adv_factor = 0.3`` are the
reference code's defaults (main.py: ``--adv_weight 0.1``, ``--alpha 0.3``, so the
target adversarial term weighs 0.03); D and G terms have weight 1 there.

One iteration runs the phases **D, G, C, F** in that order (as the reference),
then the baselines'. Each phase recomputes what it needs from the parameters the
phases before it produced: ``G`` is trained against the updated ``D``; ``F`` is
trained through the updated ``C``, ``G`` and ``D``. Only the noise ``z, z'`` is
drawn once per step (``step_inputs``) and shared by the phases, so all phases see the
same samples, as in the reference.

Baselines: ``source_only`` updates ``F_src`` and ``C_src``: the same architecture and the
same initial weights as ``F`` and ``C``, the same batches, steps and optimizer
blocks, trained on ``CE(C_src(F_src(x_s)), y_s)`` only (the reference's
``Sourceonly`` trainer, run here in the same job). ``eval/target_accuracy``
(``C(F(x))``) is reported next to ``eval/source_only_accuracy``
(``C_src(F_src(x))``), both on the held-out labelled target *test* split.
``oracle`` updates ``F_oracle`` and ``C_oracle`` the same way on labelled *target*
training images (the data's ``target_labeled`` stream, read by no other phase): the target
oracle of ``eval/oracle_accuracy`` and ``eval/gap_closed``.

Networks (the reference's digit models, NHWC, 32x32): F = conv5(ndf)-ReLU-
pool2-conv5(ndf)-ReLU-pool2-conv5(2 ndf)-ReLU (valid padding, a 1x1x2ndf
embedding); C = fc(2 ndf)-ReLU-fc(N); G = the DCGAN generator from a
``[y (N+1), F(x) (2 ndf), z (nz)]`` vector: convT2 to 2x2x8ngf, then four
stride-2 convT4 (BN-ReLU between, no biases) up to 32x32 and tanh;
D = four [conv3-BN-LeakyReLU(0.2)-maxpool] (ndf, 2, 4, 2 ndf; the last pool 4x4
to 1x1), then a linear real/fake logit and a linear N-way class head.

Departures from the reference code (yogeshbalaji/Generate_To_Adapt; the audit:
``docs/gta.md``):

- Every phase recomputes its forward pass with the current parameters (the reference's F loss
  backpropagates through C and G graphs made before their optimizer steps).
- D's real/fake head returns a logit and the BCE is computed on logits.
- Both classifiers are scored on the held-out target *test* split at the last step (the
  reference scores the target *training* set, with model selection on source validation).
- RGB images in [-1, 1] for every network (the reference: grayscale, F normalised apart).
- BatchNorm eps 1e-5, momentum 0.9; G and D always normalise with batch statistics, as there.
- No learning-rate decay (the reference's ``--lrd``); DCGAN init N(0, 0.02) for convolutions,
  drawn from an RngBitGenerator key (:meth:`GTA.init`).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.metrics import classify_eval, image_metrics
from ganda_jax.nets.layers import BatchNorm, Conv, ConvTranspose, Dtype, conv_init, max_pool

#: G upsamples 1x1 -> 2 -> 4 -> 8 -> 16 -> 32, D pools 32 -> 1: the digit size.
IMAGE_SIZE = 32


class FeatureNet(nn.Module):
    """F: the reference's LeNet embedding, [B, 32, 32, C] -> [B, 2 ndf]."""

    ndf: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x.astype(self.dtype)
        for i, features in enumerate((self.ndf, self.ndf, 2 * self.ndf)):
            h = nn.relu(Conv(features, 5, padding=0, dtype=self.dtype)(h))
            if i < 2:
                h = max_pool(h, 2)
        return h.reshape(h.shape[0], -1)


class Classifier(nn.Module):
    """C: fc(hidden)-ReLU-fc(num_classes) on the embedding; float32 logits."""

    hidden: int = 128
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, e):
        h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(e.astype(self.dtype)))
        return nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)


class Generator(nn.Module):
    """G: DCGAN generator from a code vector [B, d] to [B, 32, 32, out] in [-1, 1] (float32)."""

    ngf: int = 64
    out_channels: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, code, *, train: bool):
        h = code.astype(self.dtype)[:, None, None, :]
        # PyTorch ConvTranspose2d(k, s, p) == lax conv_transpose padded k - 1 - p per side:
        # (2, 1, 0) then (4, 2, 1), as the reference.
        layers = [(8, 2, 1, 1)] + [(m, 4, 2, 2) for m in (4, 2, 1)]
        for mult, k, s, pad in layers:
            h = ConvTranspose(
                self.ngf * mult,
                (k, k),
                strides=(s, s),
                padding=((pad, pad), (pad, pad)),
                use_bias=False,
                kernel_init=conv_init,
                dtype=self.dtype,
            )(h)
            h = nn.relu(BatchNorm(dtype=self.dtype)(h, train=train))
        h = ConvTranspose(
            self.out_channels,
            (4, 4),
            strides=(2, 2),
            padding=((2, 2), (2, 2)),
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
        )(h)
        return jnp.tanh(h.astype(jnp.float32))


class Discriminator(nn.Module):
    """D: four [conv3-BN-LeakyReLU-maxpool] blocks, then a real/fake logit [B] and class logits
    [B, num_classes] (both float32, no sigmoid/softmax: the losses take logits)."""

    ndf: int = 64
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = x.astype(self.dtype)
        for mult, pool in ((1, 2), (2, 2), (4, 2), (2, 4)):
            h = Conv(self.ndf * mult, 3, padding=1, dtype=self.dtype)(h)
            h = nn.leaky_relu(BatchNorm(dtype=self.dtype)(h, train=train), 0.2)
            h = max_pool(h, pool)
        h = h.reshape(h.shape[0], -1)
        data = nn.Dense(1, dtype=self.dtype)(h)[:, 0]
        cls = nn.Dense(self.num_classes, dtype=self.dtype)(h)
        return data.astype(jnp.float32), cls.astype(jnp.float32)


class GTA(classify_eval.TaskClassifier, engine.Method):
    name = "gta"
    data_task = "classify"
    players: ClassVar[dict[str, str]] = {"F": "F", "C": "C", "G": "G", "D": "D"}
    baselines = (engine.source_only("F", "C"), engine.target_oracle("F", "C"))

    def __init__(self, config):
        super().__init__(config)
        if config.image_size != IMAGE_SIZE:
            raise ValueError(
                f"GTA's digit networks are built for {IMAGE_SIZE}x{IMAGE_SIZE} images "
                f"(G upsamples 1 -> 32, D pools 32 -> 1); got image_size={config.image_size}"
            )
        m, n = config.model, config.data.num_classes
        self.num_classes = n
        self.F = FeatureNet(ndf=m.ndf, dtype=self.dtype)
        self.C = Classifier(hidden=2 * m.ndf, num_classes=n, dtype=self.dtype)
        self.G = Generator(ngf=m.ngf, dtype=self.dtype)
        self.D = Discriminator(ndf=m.ndf, num_classes=n, dtype=self.dtype)

    # --- data -----------------------------------------------------------------
    prepare = staticmethod(engine.adaptation_batch)

    def step_inputs(self, rng, batch, extra):
        # The noise z (source) and z' (target) of this step, shared by the D, G and F phases.
        n = batch["source"].shape[0]
        z_s, z_t = self.noise(rng, 2 * n).reshape(2, n, self.config.model.nz)
        return {"z_s": z_s, "z_t": z_t}

    # --- model ----------------------------------------------------------------
    def init(self, rng, batch):
        # Flax draws every parameter with its own threefry call, and XLA:CPU takes seconds to
        # compile each (about 55 s for this init, 10 s with RngBitGenerator keys). The init runs
        # once, with replicated outputs, so the RBG stream is safe here.
        data = jax.random.key_data(rng)
        rng = jax.random.wrap_key_data(jnp.concatenate([data, data]), impl="rbg")
        k_f, k_c, k_g, k_d = jax.random.split(rng, 4)
        x = batch["source"][:1]
        f = self.F.init(k_f, x)["params"]
        c = self.C.init(k_c, self.F.apply({"params": f}, x))["params"]
        code = self.code(
            jnp.zeros((1, self.config.model.nz)),
            self.F.apply({"params": f}, x),
            jnp.zeros((1,), jnp.int32),
        )
        g = self.G.init(k_g, code, train=False)
        d = self.D.init(k_d, x, train=False)
        params = {"F": f, "C": c, "G": g["params"], "D": d["params"]}
        model_state = {
            "G": {"batch_stats": g["batch_stats"]},
            "D": {"batch_stats": d["batch_stats"]},
        }
        return params, model_state, {}

    def noise(self, rng, n: int):
        return jax.random.normal(rng, (n, self.config.model.nz), jnp.float32)

    def code(self, z, embedding, labels):
        """G's input ``[one_hot(labels, N + 1), F(x), z]``; label N is "unknown" (target)."""
        onehot = jax.nn.one_hot(labels, self.num_classes + 1, dtype=jnp.float32)
        return jnp.concatenate(
            [onehot, embedding.astype(jnp.float32), z.astype(jnp.float32)], axis=-1
        )

    def unknown(self, n: int):
        return jnp.full((n,), self.num_classes, jnp.int32)

    def embed(self, params, x):
        return self.F.apply({"params": params["F"]}, x)

    def task_logits(self, params, x):
        return self.C.apply({"params": params["C"]}, self.embed(params, x))

    def generate(self, params, model_state, code):
        """``(G(code) float32 with batch statistics, G's updated running statistics)``."""
        return engine.apply(self.G, params, model_state, "G", code, train=True)

    def discriminate(self, params, model_state, x):
        """``(real/fake logits [B], class logits [B, N], D's updated running statistics)``."""
        (data, cls), state = engine.apply(self.D, params, model_state, "D", x, train=True)
        return data, cls, state

    def generated_pair(self, params, inp: engine.PhaseInputs, emb_s, emb_t):
        """G's source and target images from embeddings, with this step's noise."""
        b, ms = inp.batch, inp.model_state
        code_s = self.code(inp.draws["z_s"], emb_s, b["label"])
        code_t = self.code(inp.draws["z_t"], emb_t, self.unknown(len(b["target"])))
        return self.generate(params, ms, code_s)[0], self.generate(params, ms, code_t)[0]

    def phases(self):
        return (
            engine.Phase("D", ("D",), self.discriminator_loss),
            engine.Phase("G", ("G",), self.generator_loss),
            engine.Phase("C", ("C",), self.classifier_loss),
            engine.Phase("F", ("F",), self.embedding_loss),
        )

    def discriminator_loss(self, params, inp: engine.PhaseInputs):
        b, ms = inp.batch, inp.model_state
        emb_s, emb_t = self.embed(params, b["source"]), self.embed(params, b["target"])
        gen_s, gen_t = self.generated_pair(params, inp, emb_s, emb_t)
        real, real_cls, d_state = self.discriminate(params, ms, b["source"])
        fake_s, _, _ = self.discriminate(params, ms, jax.lax.stop_gradient(gen_s))
        fake_t, _, _ = self.discriminate(params, ms, jax.lax.stop_gradient(gen_t))
        data_real = losses.sigmoid_bce(logits=real, labels=1.0)
        cls_real = losses.softmax_cross_entropy(logits=real_cls, labels=b["label"])
        data_fake_s = losses.sigmoid_bce(logits=fake_s, labels=0.0)
        data_fake_t = losses.sigmoid_bce(logits=fake_t, labels=0.0)
        loss = data_real + cls_real + data_fake_s + data_fake_t
        metrics = {
            "D/data_real": data_real,
            "D/cls_real": cls_real,
            "D/data_fake_src": data_fake_s,
            "D/data_fake_tgt": data_fake_t,
            "D/cls_real_acc": losses.accuracy(logits=real_cls, labels=b["label"]),
        }
        return loss, engine.Out(metrics=metrics, model_state={"D": d_state})

    def generator_loss(self, params, inp: engine.PhaseInputs):
        b, ms = inp.batch, inp.model_state
        code_s = self.code(inp.draws["z_s"], self.embed(params, b["source"]), b["label"])
        gen_s, g_state = self.generate(params, ms, code_s)
        data, cls, _ = self.discriminate(params, ms, gen_s)
        adv = losses.sigmoid_bce(logits=data, labels=1.0)
        cls_ce = losses.softmax_cross_entropy(logits=cls, labels=b["label"])
        metrics = {
            "G/adv": adv,
            "G/cls": cls_ce,
            "G/cls_acc": losses.accuracy(logits=cls, labels=b["label"]),
        }
        return adv + cls_ce, engine.Out(metrics=metrics, model_state={"G": g_state})

    def classifier_loss(self, params, inp: engine.PhaseInputs):
        b = inp.batch
        logits = self.task_logits(params, b["source"])
        ce = losses.softmax_cross_entropy(logits=logits, labels=b["label"])
        acc = losses.accuracy(logits=logits, labels=b["label"])
        return ce, engine.Out(metrics={"C/source_ce": ce, "C/source_acc": acc})

    def embedding_loss(self, params, inp: engine.PhaseInputs):
        cfg, b, ms = self.config.loss, inp.batch, inp.model_state
        emb_s, emb_t = self.embed(params, b["source"]), self.embed(params, b["target"])
        logits = self.C.apply({"params": params["C"]}, emb_s)
        ce = losses.softmax_cross_entropy(logits=logits, labels=b["label"])
        # G, D and C as the earlier phases of this step left them; gradients reach F only.
        gen_s, gen_t = self.generated_pair(params, inp, emb_s, emb_t)
        _, cls_s, _ = self.discriminate(params, ms, gen_s)
        data_t, _, _ = self.discriminate(params, ms, gen_t)
        cls_src = losses.softmax_cross_entropy(logits=cls_s, labels=b["label"])
        adv_tgt = losses.sigmoid_bce(logits=data_t, labels=1.0)
        a = cfg.adv_weight
        loss = ce + a * cls_src + a * cfg.target_adv_factor * adv_tgt
        metrics = {"F/source_ce": ce, "F/cls_src": cls_src, "F/adv_tgt": adv_tgt}
        return loss, engine.Out(metrics=metrics)

    # --- samples ----------------------------------------------------------------
    @functools.cached_property
    def _generate_fn(self):
        def fn(params, model_state, x, labels, z):
            code = self.code(z, self.embed(params, x), labels)
            return self.generate(params, model_state, code)[0]

        return jax.jit(fn)

    def samples(self, state, batch):
        """Generated source-like images from test images (G with batch statistics).

        ``generated_per_class``: row c holds G(z, F(x), c) for up to 8 source test
        images x of class c (one G call for all rows). ``target_generated``: target
        test images, then G(z, F(x_t), unknown) for them: what F makes of the target.
        """
        from ganda_jax.train.writers import image_grid

        n = 8
        p, ms = jax.device_get(state.params), jax.device_get(state.model_state)
        src = self.data.test_split("source")
        idx = [np.flatnonzero(src["label"] == c)[:n] for c in range(self.num_classes)]
        order = np.concatenate(idx)
        x = image_metrics.from_uint8(src["image"][order], np.float32)
        z = self.noise(jax.random.PRNGKey(0), len(order))
        gen = np.asarray(self._generate_fn(p, ms, x, src["label"][order], z))
        ends = np.cumsum([len(i) for i in idx])
        per_class = np.split(gen, ends[:-1])

        tgt = self.data.test_split("target")["image"][: 2 * n]
        xt = image_metrics.from_uint8(tgt, np.float32)
        zt = self.noise(jax.random.PRNGKey(1), len(tgt))
        gen_t = np.asarray(self._generate_fn(p, ms, xt, np.asarray(self.unknown(len(tgt))), zt))
        return {
            "generated_per_class": image_grid(per_class),
            "target_generated": image_grid([tgt, gen_t]),
        }
