"""PixelDA (Bousmalis, Silberman, Dohan, Erhan, Krishnan 2017): pixel-level domain adaptation.

A generator ``G(x_s, z)`` restyles labelled source images as target images; a
discriminator ``D`` tells real target images from restyled ones; a task
classifier ``T`` learns the labels on source images *and* on their restyled
versions, so it works on the (unlabelled) target domain. The paper's objective

    min_{G,T} max_D  alpha L_d(D, G) + beta L_t(G, T)

    L_d = E_{x_t}[log D(x_t)] + E_{x_s,z}[log(1 - D(G(x_s, z)))]
    L_t = E_{x_s,y_s,z}[-y_s^T log T(G(x_s, z)) - y_s^T log T(x_s)]

with ``z ~ U(-1, 1)^10``. Players and one iteration (every phase sees the
parameters the phases before it produced):

1. **D phase** (updates ``D``). Fakes ``G(x_s, z)`` from the current G, then

   L_D = w_d [BCE(D(x_t), 1) + BCE(D(G(x_s, z)), 0)]         (``loss.gan='nsgan'``)

2. **G/T phase** (updates ``G`` and ``T`` together; D frozen at its new value), on
   the same ``x_s`` and ``z`` as the D phase, so G's forward pass is the one that made D's
   fakes and XLA computes it once (one z per iteration, as in the PyTorch-GAN reference,
   whose D step reuses G's fakes; the authors' code, running its two steps as separate
   graph runs, draws two).
   The non-saturating generator loss, as in the authors' code, and the task loss
   on *logits* (log-softmax inside the cross-entropy, never a softmax before it):

   L_GT = w_style BCE(D(G(x_s, z)), 1) + w_task [CE(T(G(x_s, z)), y_s) + CE(T(x_s), y_s)]

Baselines (:class:`ganda_jax.engine.Baseline`, phases the engine adds after these two):
``source_only`` trains a copy ``T_src`` of T (same initial weights, batches, steps and
optimizer settings) on ``CE(T_src(x_s), y_s)`` only, so ``eval/target_accuracy`` (T) next
to ``eval/source_only_accuracy`` measures what adaptation adds; ``oracle`` trains
``T_oracle`` on labelled *target* training images (the data's ``target_labeled`` stream,
read by no other phase), which bounds what adaptation can reach:
``eval/gap_closed = (target - source_only) / (oracle - source_only)``. All on the held-out
labelled target *test* split.

Networks (NHWC, 32x32 digits): G projects ``z`` with a dense layer to
``noise_channels`` image-sized maps, concatenates them to ``x_s``, then
conv3x3-ReLU, ``n_blocks`` residual blocks [conv3-BN-ReLU-conv3-BN] + x,
conv3x3 and tanh (64 filters throughout in the paper). D is the shared PatchGAN
(:class:`ganda_jax.nets.layers.PatchDiscriminator`; 2x2 patches of logits at 32 px,
like the PyTorch-GAN reference's). T is the MNIST classifier the paper takes
from DANN/DSN: conv5x5(32)-pool-conv5x5(48)-pool-fc100-fc100-fc10.

Weights: ``w_d, w_style, w_task`` are ``loss.discriminator_weight``,
``loss.style_weight`` and ``loss.task_weight`` (the paper's alpha on each side
of the minimax, and beta). All three are 1 by default, as in the authors'
hparams.py (``domain_loss_weight``, ``style_transfer_loss_weight``, source and
transferred task weights, ``task_loss_in_g_weight``); the numbers the paper
text itself reports for alpha and beta were not checked against the paper here.
``loss.gan='lsgan'`` gives the PyTorch-GAN reference's least-squares losses.

Departures from the references (PyTorch-GAN's pixelda, the authors' TensorFlow code; the
audit: ``docs/pixelda.md``):

- T returns logits into the cross-entropy (the PyTorch-GAN reference puts a softmax first).
- D first, then G and T together in one phase (the authors' order; their T trains in the D
  step); the task terms summed as in the paper (the reference averages them).
- BatchNorm (G only) eps 1e-5, momentum 0.9; G's running statistics are updated once per
  step, by the G/T phase, and used for samples.
- D is the shared PatchGAN (as the reference), not the authors' global D.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.metrics import classify_eval, image_metrics
from ganda_jax.nets.layers import FAST, BatchNorm, Conv, Dtype, PatchDiscriminator, max_pool


class ResidualBlockBN(nn.Module):
    """[conv3-BN-ReLU-conv3-BN] + x (zero padding), the PixelDA generator block."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = Conv(self.features, 3, padding=1, dtype=self.dtype)(x)
        y = nn.relu(BatchNorm(dtype=self.dtype)(y, train=train))
        y = Conv(self.features, 3, padding=1, dtype=self.dtype)(y)
        return x + BatchNorm(dtype=self.dtype)(y, train=train)


class Generator(nn.Module):
    """G(x, z): dense(z) -> image-shaped noise maps, concat x, conv, residual blocks, tanh."""

    features: int = 64
    n_blocks: int = 6
    noise_channels: int = 1
    out_channels: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, z, *, train: bool):
        b, h, w, _ = x.shape
        noise = nn.Dense(h * w * self.noise_channels, dtype=self.dtype)(z.astype(self.dtype))
        noise = noise.reshape(b, h, w, self.noise_channels)
        y = jnp.concatenate([x.astype(self.dtype), noise], axis=-1)
        y = nn.relu(Conv(self.features, 3, padding=1, dtype=self.dtype)(y))
        for _ in range(self.n_blocks):
            y = ResidualBlockBN(self.features, dtype=self.dtype)(y, train=train)
        y = Conv(self.out_channels, 3, padding=1, dtype=self.dtype)(y)
        return jnp.tanh(y)


class Classifier(nn.Module):
    """The DANN/DSN MNIST classifier used by the paper; returns float32 logits."""

    features: Sequence[int] = (32, 48)
    hidden: Sequence[int] = (100, 100)
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = x.astype(self.dtype)
        for f in self.features:
            y = nn.relu(nn.Conv(f, (5, 5), padding="SAME", dtype=self.dtype, **FAST)(y))
            y = max_pool(y, 2)
        y = y.reshape(y.shape[0], -1)
        for n in self.hidden:
            y = nn.relu(nn.Dense(n, dtype=self.dtype)(y))
        return nn.Dense(self.num_classes, dtype=self.dtype)(y).astype(jnp.float32)


class PixelDA(classify_eval.TaskClassifier, engine.Method):
    name = "pixelda"
    data_task = "classify"
    players = {"G": "G", "D": "D", "T": "T"}
    baselines = (engine.source_only("T"), engine.target_oracle("T"))

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.G = Generator(
            features=m.ngf,
            n_blocks=m.n_blocks,
            noise_channels=m.noise_channels,
            dtype=self.dtype,
        )
        self.D = PatchDiscriminator(
            ndf=m.ndf, n_layers=m.n_layers_D, norm=m.norm_D, dtype=self.dtype
        )
        self.T = Classifier(
            features=tuple(m.t_features),
            hidden=tuple(m.t_hidden),
            num_classes=config.data.num_classes,
            dtype=self.dtype,
        )

    # --- data -----------------------------------------------------------------
    prepare = staticmethod(engine.adaptation_batch)

    def step_inputs(self, rng, batch, extra):
        # One z per iteration, shared by both phases: with G unchanged by the D phase, D's
        # fakes and G/T's forward pass are one computation, which XLA does once.
        return {"z": self.noise(rng, batch["source"].shape[0])}

    # --- model ----------------------------------------------------------------
    def init(self, rng, batch):
        k_g, k_d, k_t = jax.random.split(rng, 3)
        x = batch["source"][:1]
        g = self.G.init(k_g, x, jnp.zeros((1, self.config.model.noise_dim)), train=False)
        params = {
            "G": g["params"],
            "D": self.D.init(k_d, x)["params"],
            "T": self.T.init(k_t, x)["params"],
        }
        return params, {"G": {"batch_stats": g["batch_stats"]}}, {}

    def noise(self, rng, n: int):
        return jax.random.uniform(rng, (n, self.config.model.noise_dim), minval=-1.0, maxval=1.0)

    def generate(self, params, model_state, x, z, *, train: bool):
        """``(G(x, z) float32, G's new batch stats)``; train=False uses the running averages."""
        y, state = engine.apply(self.G, params, model_state, "G", x, z, train=train)
        return y.astype(jnp.float32), state

    def task_logits(self, params, x):
        return self.T.apply({"params": params["T"]}, x)

    def discriminate(self, params, x):
        return self.D.apply({"params": params["D"]}, x)

    def phases(self):
        return (
            engine.Phase("D", ("D",), self.discriminator_loss),
            engine.Phase("GT", ("G", "T"), self.generator_task_loss),
        )

    def discriminator_loss(self, params, inp: engine.PhaseInputs):
        cfg, b = self.config.loss, inp.batch
        # G's statistics are updated by the G/T phase only (once per step).
        fake, _ = self.generate(params, inp.model_state, b["source"], inp.draws["z"], train=True)
        real_logits = self.discriminate(params, b["target"])
        fake_logits = self.discriminate(params, jax.lax.stop_gradient(fake))
        loss_d = losses.gan_discriminator_loss(
            real_logits=real_logits, fake_logits=fake_logits, loss_type=cfg.gan
        )
        metrics = {
            "D/adv": loss_d,
            "D/real_logit": jnp.mean(real_logits),
            "D/fake_logit": jnp.mean(fake_logits),
        }
        return cfg.discriminator_weight * loss_d, engine.Out(metrics=metrics)

    def generator_task_loss(self, params, inp: engine.PhaseInputs):
        cfg, b = self.config.loss, inp.batch
        x_s, y_s = b["source"], b["label"]
        fake, g_state = self.generate(params, inp.model_state, x_s, inp.draws["z"], train=True)
        style = losses.gan_generator_loss(
            fake_logits=self.discriminate(params, fake), loss_type=cfg.gan
        )
        logits_src = self.task_logits(params, x_s)
        logits_fake = self.task_logits(params, fake)
        ce_src = losses.softmax_cross_entropy(logits=logits_src, labels=y_s)
        ce_fake = losses.softmax_cross_entropy(logits=logits_fake, labels=y_s)
        loss = cfg.style_weight * style + cfg.task_weight * (ce_src + ce_fake)
        metrics = {
            "G/style": style,
            "T/source_ce": ce_src,
            "T/transferred_ce": ce_fake,
            "T/source_acc": losses.accuracy(logits=logits_src, labels=y_s),
            "T/transferred_acc": losses.accuracy(logits=logits_fake, labels=y_s),
        }
        return loss, engine.Out(metrics=metrics, model_state={"G": g_state})

    # --- evaluation -------------------------------------------------------------
    @functools.cached_property
    def _restyle_fn(self):
        return jax.jit(
            lambda params, model_state, x, z: self.generate(params, model_state, x, z, train=False)[
                0
            ]
        )

    def samples(self, state, batch):
        """Rows: source test images, two restyled versions (two z), target test images."""
        from ganda_jax.train.writers import image_grid

        n = 8
        src = self.data.test_split("source")["image"][:n]
        tgt = self.data.test_split("target")["image"][:n]
        p, ms = jax.device_get(state.params), jax.device_get(state.model_state)
        x = image_metrics.from_uint8(src, np.float32)
        rows = [src]
        for i in range(2):
            z = self.noise(jax.random.PRNGKey(i), len(src))
            rows.append(np.asarray(self._restyle_fn(p, ms, x, z)))
        return {"source_restyled_target": image_grid(rows + [tgt])}
