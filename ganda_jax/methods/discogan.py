"""DiscoGAN (Kim, Cha, Kim, Lee, Kim 2017): discovering cross-domain relations, A <-> B.

Players: generators ``G_AB: A -> B`` and ``G_BA: B -> A``, discriminators
``D_A`` (real A vs G_BA(b)) and ``D_B`` (real B vs G_AB(a)). The networks are
those of the PyTorch-GAN reference (eriklindernoren/PyTorch-GAN,
``implementations/discogan``), at 64x64:

- :class:`UNetGenerator`: 6 stride-2 4x4 conv downs with 64, 128, 256, 512,
  512, 512 channels (instance norm on all but the first and the last, LeakyReLU
  0.2, dropout 0.5 from the third on), 5 stride-2 4x4 transposed-conv ups with
  512, 512, 256, 128, 64 channels (instance norm, ReLU, dropout 0.5 on the
  first three), each concatenated with the encoder feature map of the same
  size, then a nearest x2 upsample, a 4x4 conv to 3 channels and tanh.
- :class:`PatchDiscriminator`: three stride-2 4x4 convs (64 no norm, 128, 256
  with instance norm; LeakyReLU 0.2) and a 4x4 conv to one logit per patch:
  an 8x8 map at 64 px (receptive field 46x46).

One iteration (the reference's order):

1. **G phase** (updates G_AB, G_BA; dropout on, a fresh key per generator call)::

     L_G = L_GAN(D_B(G_AB(a)), real) + L_GAN(D_A(G_BA(b)), real)
           + lambda_recon [d(G_BA(G_AB(a)), a) + d(G_AB(G_BA(b)), b)]
           (+ lambda_pixel [|G_AB(a) - b|_1 + |G_BA(b) - a|_1]   only if data.paired)

   with the paper's choices as defaults: the standard GAN loss (binary
   cross-entropy on logits, non-saturating for G: ``loss.gan='nsgan'``), the
   squared error ``d = l2`` (``loss.recon_distance``), ``lambda_recon = 1``.
2. **D phase** (updates D_A, D_B) on the fakes made in step 1, i.e. by the
   generators *before* their update (passed on through the phase carry)::

     L_D = [BCE(D_A(a), 1) + BCE(D_A(G_BA(b)), 0)] + [BCE(D_B(b), 1) + BCE(D_B(G_AB(a)), 0)]

Adam(2e-4, 0.5, 0.999), constant learning rate, for both groups.

The pixelwise translation loss needs *aligned* pairs (``data.paired=True``:
example ``i`` of A and of B show the same thing, as in edges2shoes); it is off
by default, and asking for it on a source whose A and B are unpaired (the
embedded translation pair, the tfds CycleGAN sets) is an error. With
``paired`` the loader draws one index per row for both domains (one stream
``AB``) and crops/flips both images alike.

Departures from the PyTorch-GAN reference (all configurable back; the audit:
``docs/discogan.md``): the paper's GAN log loss (``loss.gan='lsgan'``: the reference's), the
paper's L2 reconstruction (``loss.recon_distance='l1'``: the reference's), terms summed (the
reference averages pairs), the pixelwise loss only with ``data.paired``, zero biases. The
official SKTBrain code's feature matching, curriculum and alternating schedule are not ported.

Evaluation: on the embedded pair, PSNR of each translation against its hidden
counterpart (``eval/psnr_AtoB``, ``eval/psnr_BtoA``) next to the identity and
mean-image baselines (:mod:`ganda_jax.metrics.translation_eval`). Dropout is off for
evaluation, samples and ``generate`` (the reference's ``G.eval()``).

``model.num_downs`` (default 6, the reference) lets the U-Net depth follow
smaller images: the image side must be a multiple of ``2**num_downs``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.data import sources
from ganda_jax.metrics import image_metrics, translation_eval
from ganda_jax.nets.layers import Conv, ConvTranspose, Dtype, InstanceNorm, conv_init, make_norm

#: The paired training stream and its two image fields (see ``data.paired``).
PAIRED_STREAM = "AB"
PAIRED_FIELDS = {"A": "A_image", "B": "B_image"}


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def unet_channels(ngf: int, num_downs: int) -> list[int]:
    """Channels of the U-Net's down blocks: ngf x (1, 2, 4, 8, 8, ...)."""
    return [ngf * min(2**i, 8) for i in range(num_downs)]


class UNetDown(nn.Module):
    """Conv 4x4 stride 2 pad 1 - [instance norm] - LeakyReLU(0.2) - [dropout]."""

    features: int
    normalize: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = Conv(self.features, 4, stride=2, padding=1, dtype=self.dtype)(x)
        if self.normalize:
            h = InstanceNorm(dtype=self.dtype)(h)
        h = nn.leaky_relu(h, 0.2)
        if self.dropout:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h


class UNetUp(nn.Module):
    """Transposed conv 4x4 stride 2 pad 1 - instance norm - ReLU - [dropout], then ``[h, skip]``.

    PyTorch's ``ConvTranspose2d(k=4, s=2, p=1)`` doubles the size; its flax
    equivalent pads the dilated input by ``k - 1 - p = 2`` on each side.
    """

    features: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip, *, train: bool):
        h = ConvTranspose(
            self.features,
            (4, 4),
            strides=(2, 2),
            padding=((2, 2), (2, 2)),
            kernel_init=conv_init,
            dtype=self.dtype,
        )(x.astype(self.dtype))
        h = nn.relu(InstanceNorm(dtype=self.dtype)(h))
        if self.dropout:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)


class UNetGenerator(nn.Module):
    """The PyTorch-GAN DiscoGAN ``GeneratorUNet`` (``num_downs`` downs, one fewer ups).

    Down ``i`` (0-based) has ``ngf * min(2**i, 8)`` channels, no norm for the
    first and the last (a 1x1 map at 64 px), dropout for ``i >= 2``. Up blocks
    mirror downs ``num_downs-2 .. 0``: same channels, dropout where the mirrored
    down has it, and concatenate that down's output. Final: nearest x2
    upsample, zero pad (top/left 2, bottom/right 1), 4x4 conv, tanh.

    Submodules are named ``down1..downN``, ``up1..up(N-1)``, ``final`` as in
    the reference.
    """

    ngf: int = 64
    num_downs: int = 6
    dropout: float = 0.5
    out_channels: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        n = self.num_downs
        if n < 2:
            raise ValueError(f"num_downs must be >= 2, got {n}")
        size = x.shape[1]
        if x.shape[1] != x.shape[2] or size % 2**n:
            raise ValueError(
                f"UNetGenerator with num_downs={n} needs square images whose side is a "
                f"multiple of {2**n}; got {x.shape[1]}x{x.shape[2]}"
            )
        channels = unet_channels(self.ngf, n)
        drop = lambda i: self.dropout if i >= 2 else 0.0
        skips = []
        h = x
        for i, c in enumerate(channels):
            h = UNetDown(
                c,
                normalize=0 < i < n - 1,
                dropout=drop(i),
                dtype=self.dtype,
                name=f"down{i + 1}",
            )(h, train=train)
            skips.append(h)
        for j, i in enumerate(range(n - 2, -1, -1)):
            h = UNetUp(channels[i], dropout=drop(i), dtype=self.dtype, name=f"up{j + 1}")(
                h, skips[i], train=train
            )
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = Conv(self.out_channels, 4, padding=((2, 1), (2, 1)), dtype=self.dtype, name="final")(h)
        return jnp.tanh(h)


class PatchDiscriminator(nn.Module):
    """The PyTorch-GAN DiscoGAN discriminator: ``n_layers`` stride-2 blocks, then 1 logit/patch.

    C(ndf, no norm) - C(2 ndf) - C(4 ndf) ... (4x4, stride 2, pad 1, instance
    norm, LeakyReLU 0.2), zero pad (top/left 2, bottom/right 1), 4x4 conv to
    one channel. Output ``[B, H / 2**n_layers, W / 2**n_layers, 1]`` raw float32
    scores (no sigmoid: the loss decides).

    Unlike :class:`ganda_jax.nets.layers.PatchDiscriminator` (CycleGAN/pix2pix's
    70x70, with a stride-1 512-channel block), this is the reference's smaller
    network with a 46x46 receptive field at 3 layers.
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "instance"  # 'none' only for tests (e.g. of the receptive field)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x
        for i in range(self.n_layers):
            h = Conv(self.ndf * 2**i, 4, stride=2, padding=1, dtype=self.dtype)(h)
            if i > 0:
                h = make_norm(self.norm, self.dtype)(h)
            h = nn.leaky_relu(h, 0.2)
        h = Conv(1, 4, padding=((2, 1), (2, 1)), dtype=self.dtype)(h)
        return h.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Paired data (data.paired=True)
# ---------------------------------------------------------------------------


class PairedSource:
    """Example ``i`` = ``{'A_image': a[i]['image'], 'B_image': b[i]['image']}`` (aligned pairs)."""

    def __init__(self, a, b):
        if len(a) != len(b):
            raise ValueError(
                f"data.paired=True needs as many A as B training images (pair i = A[i], B[i]); "
                f"got {len(a)} A and {len(b)} B"
            )
        files_a, files_b = getattr(a, "files", None), getattr(b, "files", None)
        if files_a is not None and files_b is not None:
            for fa, fb in zip(files_a, files_b):
                if fa.stem != fb.stem:
                    raise ValueError(
                        f"data.paired=True pairs the A and B folders by sorted file name, but "
                        f"{fa} is paired with {fb}; give each pair the same name in both folders"
                    )
        self.a, self.b = a, b

    def __len__(self):
        return len(self.a)

    def __getitem__(self, index):
        return {
            PAIRED_FIELDS["A"]: self.a[index]["image"],
            PAIRED_FIELDS["B"]: self.b[index]["image"],
        }

    def describe(self, index):
        a = sources.describe_example(self.a, index)
        return f"pair ({a}, {sources.describe_example(self.b, index)})"


def paired_transform(transform):
    """Applies an image ``transform`` to both images of a pair with the same random draws."""

    def fn(example, rng):
        seed = int(rng.integers(2**63))
        return {
            field: transform({"image": example[field]}, np.random.default_rng(seed))["image"]
            for field in PAIRED_FIELDS.values()
        }

    return fn


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def _distance(kind: str, x, y):
    if kind == "l1":
        return losses.l1(x=x, y=y)
    if kind == "l2":
        return losses.l2(x=x, y=y)
    raise ValueError(f"unknown distance {kind!r}; expected 'l1' or 'l2'")


class DiscoGAN(translation_eval.TranslationEvalMixin, engine.Method):
    name = "discogan"
    data_task = "translate"
    players = {"G_AB": "G", "G_BA": "G", "D_A": "D", "D_B": "D"}

    def __init__(self, config):
        super().__init__(config)
        m, cfg, data = config.model, config.loss, config.data
        size = config.image_size
        if size % 2**m.num_downs or size % 2**m.n_layers_D:
            raise ValueError(
                f"image_size={size} must be a multiple of 2**model.num_downs="
                f"{2**m.num_downs} and of 2**model.n_layers_D={2**m.n_layers_D}"
            )
        for key, value in (
            ("recon_distance", cfg.recon_distance),
            ("pixel_distance", cfg.pixel_distance),
        ):
            if value not in ("l1", "l2"):
                raise ValueError(f"loss.{key}={value!r}; expected 'l1' or 'l2'")
        if cfg.gan not in losses.GAN_LOSS_TYPES:
            raise ValueError(f"loss.gan={cfg.gan!r}; expected one of {losses.GAN_LOSS_TYPES}")
        self.paired = bool(data.get("paired", False))
        unpaired = [r for r in ("A", "B") if data[r].kind in ("embedded", "tfds")]
        if self.paired and unpaired:
            raise ValueError(
                f"data.paired=True (pixelwise translation loss) needs aligned A/B training "
                f"pairs, but data.{unpaired[0]}.kind={data[unpaired[0]].kind!r} is unpaired "
                "(the embedded pair renders A and B from independent scenes; the tfds CycleGAN "
                "sets are unpaired). Use kind='folder' (trainA/trainB paired by file name) or "
                "'npz' (A and B paired by index) for both, or set data.paired=False."
            )
        self.G = UNetGenerator(
            ngf=m.ngf, num_downs=m.num_downs, dropout=m.dropout, dtype=self.dtype
        )
        self.D = PatchDiscriminator(ndf=m.ndf, n_layers=m.n_layers_D, dtype=self.dtype)

    # --- data -----------------------------------------------------------------
    def train_streams(self):
        streams = super().train_streams()
        if not self.paired:
            return streams
        return {PAIRED_STREAM: PairedSource(streams["A"], streams["B"])}

    def train_transforms(self):
        transforms = super().train_transforms()
        if not self.paired:
            return transforms
        return {PAIRED_STREAM: paired_transform(transforms["A"])}

    def example_batch(self, batch_size):
        size = self.config.image_size
        image = np.zeros((batch_size, size, size, 3), np.uint8)
        if self.paired:
            return {PAIRED_STREAM: {f: image for f in PAIRED_FIELDS.values()}}
        return {"A": {"image": image}, "B": {"image": image}}

    def sample_images(self, batch):
        """``(a, b)`` uint8 images of a host/global batch in either layout."""
        if PAIRED_STREAM in batch:
            pair = batch[PAIRED_STREAM]
            return pair[PAIRED_FIELDS["A"]], pair[PAIRED_FIELDS["B"]]
        return batch["A"]["image"], batch["B"]["image"]

    def prepare(self, batch):
        a, b = self.sample_images(batch)
        return {
            "A": image_metrics.from_uint8(a, jnp.float32),
            "B": image_metrics.from_uint8(b, jnp.float32),
        }

    # --- model ----------------------------------------------------------------
    def init(self, rng, batch):
        k = jax.random.split(rng, 4)
        a = batch["A"][:1]
        params = {
            "G_AB": self.G.init(k[0], a)["params"],
            "G_BA": self.G.init(k[1], a)["params"],
            "D_A": self.D.init(k[2], a)["params"],
            "D_B": self.D.init(k[3], a)["params"],
        }
        return params, {}, {}

    def generate(self, params, x, direction: str):
        """Translates ``x`` (float, [-1, 1]) with dropout off; direction 'AtoB' or 'BtoA'."""
        g = {"AtoB": "G_AB", "BtoA": "G_BA"}[direction]
        return self.G.apply({"params": params[g]}, x, train=False).astype(jnp.float32)

    def _generate_train(self, params, name, x, rng):
        """A training-mode generator call: dropout on, with its own key."""
        out = self.G.apply({"params": params[name]}, x, train=True, rngs={"dropout": rng})
        return out.astype(jnp.float32)

    def phases(self):
        return (
            engine.Phase("G", ("G_AB", "G_BA"), self.generator_loss),
            engine.Phase("D", ("D_A", "D_B"), self.discriminator_loss),
        )

    def generator_loss(self, params, inp: engine.PhaseInputs):
        cfg = self.config.loss
        a, b = inp.batch["A"], inp.batch["B"]
        k = jax.random.split(inp.rng, 4)
        D = lambda name, x: self.D.apply({"params": params[name]}, x)

        fake_b = self._generate_train(params, "G_AB", a, k[0])
        fake_a = self._generate_train(params, "G_BA", b, k[1])
        rec_a = self._generate_train(params, "G_BA", fake_b, k[2])
        rec_b = self._generate_train(params, "G_AB", fake_a, k[3])
        adv_ab = losses.gan_generator_loss(fake_logits=D("D_B", fake_b), loss_type=cfg.gan)
        adv_ba = losses.gan_generator_loss(fake_logits=D("D_A", fake_a), loss_type=cfg.gan)
        recon_a = losses.cycle_loss(real=a, reconstructed=rec_a, distance=cfg.recon_distance)
        recon_b = losses.cycle_loss(real=b, reconstructed=rec_b, distance=cfg.recon_distance)
        loss = adv_ab + adv_ba + cfg.lambda_recon * (recon_a + recon_b)
        metrics = {
            "G/adv_AtoB": adv_ab,
            "G/adv_BtoA": adv_ba,
            "G/recon_A": recon_a,
            "G/recon_B": recon_b,
        }
        if self.paired and cfg.lambda_pixel > 0:
            pix_ab = _distance(cfg.pixel_distance, fake_b, b)
            pix_ba = _distance(cfg.pixel_distance, fake_a, a)
            loss += cfg.lambda_pixel * (pix_ab + pix_ba)
            metrics.update({"G/pixel_AtoB": pix_ab, "G/pixel_BtoA": pix_ba})
        return loss, engine.Out(metrics=metrics, carry={"fake_A": fake_a, "fake_B": fake_b})

    def discriminator_loss(self, params, inp: engine.PhaseInputs):
        cfg = self.config.loss
        D = lambda name, x: self.D.apply({"params": params[name]}, x)
        loss_a = losses.gan_discriminator_loss(
            real_logits=D("D_A", inp.batch["A"]),
            fake_logits=D("D_A", inp.carry["fake_A"]),
            loss_type=cfg.gan,
        )
        loss_b = losses.gan_discriminator_loss(
            real_logits=D("D_B", inp.batch["B"]),
            fake_logits=D("D_B", inp.carry["fake_B"]),
            loss_type=cfg.gan,
        )
        return loss_a + loss_b, engine.Out(metrics={"D/A": loss_a, "D/B": loss_b})
