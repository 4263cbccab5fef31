"""CycleGAN (Zhu, Park, Isola, Efros 2017): unpaired translation A <-> B.

Players: generators ``G_AB: A -> B`` and ``G_BA: B -> A`` (ResNet, 9 blocks at
256 px), discriminators ``D_A`` (real A vs G_BA(b)) and ``D_B`` (real B vs
G_AB(a)), 70x70 PatchGANs with instance norm.

One iteration, exactly as the official ``optimize_parameters``:

1. **G phase** (updates G_AB, G_BA; D frozen). With least-squares GAN losses,

   L_G = (D_B(G_AB(a)) - 1)^2 + (D_A(G_BA(b)) - 1)^2
         + lambda_A |G_BA(G_AB(a)) - a|_1 + lambda_B |G_AB(G_BA(b)) - b|_1
         + lambda_idt (lambda_B |G_AB(b) - b|_1 + lambda_A |G_BA(a) - a|_1)

   with lambda_A = lambda_B = 10, lambda_idt = 0.5.
2. **D phase** (updates D_A, D_B). The fakes made in step 1 (by the generators
   *before* their update) go through a history pool of 50 images; then

   L_D = 0.5 [(D_B(b) - 1)^2 + D_B(pool_B(G_AB(a)))^2]
       + 0.5 [(D_A(a) - 1)^2 + D_A(pool_A(G_BA(b)))^2].

``model.remat=True`` recomputes each network's activations in the backward pass
instead of storing them (for high resolutions; see ``__init__``).

Adam(2e-4, 0.5, 0.999) for both groups; constant LR for the first half of
training, then linear decay to zero (the paper's 100 + 100 epochs, in steps).

Naming departs from the official code, whose ``D_A`` judges domain B: here
``D_X`` always judges domain X. The image pool lives in the train state as
fixed-size arrays, so it is jit-friendly, checkpointed and resumed exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ganda_jax import engine, losses
from ganda_jax.metrics import image_metrics, translation_eval
from ganda_jax.nets.layers import PatchDiscriminator, ResnetGenerator


def image_pool_query(*, pool, count, images, rng, pool_size: int):
    """The CycleGAN image buffer (Shrivastava et al. 2017), one image at a time.

    While the pool holds fewer than ``pool_size`` images, each incoming image is
    stored and returned. Afterwards, with probability 1/2 an incoming image
    replaces a random stored one and the stored one is returned; otherwise the
    incoming image is returned. Returns ``(returned, pool, count)``.
    """
    if pool_size == 0:
        return images, pool, count
    keys = jax.random.split(rng, images.shape[0])

    def one(carry, xs):
        pool, count = carry
        image, key = xs
        k_swap, k_idx = jax.random.split(key)
        filling = count < pool_size
        swap = jnp.logical_and(~filling, jax.random.uniform(k_swap) > 0.5)
        idx = jnp.where(filling, count, jax.random.randint(k_idx, (), 0, pool_size))
        old = pool[idx]
        out = jnp.where(swap, old, image)
        pool = pool.at[idx].set(jnp.where(filling | swap, image, old))
        return (pool, count + filling.astype(count.dtype)), out

    (pool, count), out = jax.lax.scan(one, (pool, count), (images.astype(pool.dtype), keys))
    return out, pool, count


class CycleGAN(translation_eval.TranslationEvalMixin, engine.Method):
    name = "cyclegan"
    data_task = "translate"
    players = {"G_AB": "G", "G_BA": "G", "D_A": "D", "D_B": "D"}

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        G, D = ResnetGenerator, PatchDiscriminator
        if m.remat:
            # Each network application keeps only its input (and parameters) for the
            # backward pass and recomputes its activations there: one more forward per
            # application (about a third more FLOPs) for a fraction of the memory, so that
            # 512 px fits. The parameter tree is the same either way.
            G, D = nn.remat(G), nn.remat(D)
        self.G = G(ngf=m.ngf, n_blocks=m.n_blocks, norm=m.norm, dtype=self.dtype)
        self.D = D(ndf=m.ndf, n_layers=m.n_layers_D, norm=m.norm, dtype=self.dtype)

    # --- data -----------------------------------------------------------------
    def prepare(self, batch):
        return {k: image_metrics.from_uint8(batch[k]["image"], jnp.float32) for k in ("A", "B")}

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
        n = max(self.config.loss.pool_size, 1)
        shape = (n,) + tuple(batch["A"].shape[1:])
        extra = {
            "pool_A": jnp.zeros(shape, jnp.float32),
            "pool_B": jnp.zeros(shape, jnp.float32),
            "pool_count_A": jnp.zeros((), jnp.int32),
            "pool_count_B": jnp.zeros((), jnp.int32),
        }
        return params, {}, extra

    def generate(self, params, x, direction: str):
        g = "G_AB" if direction == "AtoB" else "G_BA"
        return self.G.apply({"params": params[g]}, x).astype(jnp.float32)

    def phases(self):
        return (
            engine.Phase("G", ("G_AB", "G_BA"), self.generator_loss),
            engine.Phase("D", ("D_A", "D_B"), self.discriminator_loss),
        )

    def generator_loss(self, params, inp: engine.PhaseInputs):
        cfg = self.config.loss
        a, b = inp.batch["A"], inp.batch["B"]
        G = lambda name, x: self.G.apply({"params": params[name]}, x).astype(jnp.float32)  # noqa: E731
        D = lambda name, x: self.D.apply({"params": params[name]}, x)  # noqa: E731

        idt = cfg.lambda_identity > 0
        # G_AB(a) and G_AB(b) (identity) as one batch, likewise G_BA: instance norm is per
        # sample, so these are the paper's sums, in fewer and larger convolutions.
        fake_b, idt_b = _split(G("G_AB", jnp.concatenate([a, b]) if idt else a), len(a))
        fake_a, idt_a = _split(G("G_BA", jnp.concatenate([b, a]) if idt else b), len(b))
        rec_a, rec_b = G("G_BA", fake_b), G("G_AB", fake_a)
        adv_ab = losses.gan_generator_loss(fake_logits=D("D_B", fake_b), loss_type=cfg.gan)
        adv_ba = losses.gan_generator_loss(fake_logits=D("D_A", fake_a), loss_type=cfg.gan)
        cyc_a = losses.cycle_loss(real=a, reconstructed=rec_a, distance=cfg.cycle_distance)
        cyc_b = losses.cycle_loss(real=b, reconstructed=rec_b, distance=cfg.cycle_distance)
        loss = adv_ab + adv_ba + cfg.lambda_A * cyc_a + cfg.lambda_B * cyc_b
        metrics = {
            "G/adv_AtoB": adv_ab,
            "G/adv_BtoA": adv_ba,
            "G/cycle_A": cyc_a,
            "G/cycle_B": cyc_b,
        }
        if idt:
            idt_b = losses.identity_loss(real=b, same=idt_b, distance=cfg.cycle_distance)
            idt_a = losses.identity_loss(real=a, same=idt_a, distance=cfg.cycle_distance)
            loss += cfg.lambda_identity * (cfg.lambda_B * idt_b + cfg.lambda_A * idt_a)
            metrics.update({"G/identity_A": idt_a, "G/identity_B": idt_b})
        return loss, engine.Out(metrics=metrics, carry={"fake_A": fake_a, "fake_B": fake_b})

    def discriminator_loss(self, params, inp: engine.PhaseInputs):
        cfg, ex = self.config.loss, inp.extra
        k_a, k_b = jax.random.split(inp.rng)
        fake_a, pool_a, count_a = image_pool_query(
            pool=ex["pool_A"],
            count=ex["pool_count_A"],
            images=inp.carry["fake_A"],
            rng=k_a,
            pool_size=cfg.pool_size,
        )
        fake_b, pool_b, count_b = image_pool_query(
            pool=ex["pool_B"],
            count=ex["pool_count_B"],
            images=inp.carry["fake_B"],
            rng=k_b,
            pool_size=cfg.pool_size,
        )

        def D(name, real, fake):  # real and fake as one batch (per-sample norm: the same sums)
            logits = self.D.apply({"params": params[name]}, jnp.concatenate([real, fake]))
            return _split(logits, len(real))

        real_a, fake_a = D("D_A", inp.batch["A"], fake_a)
        real_b, fake_b = D("D_B", inp.batch["B"], fake_b)
        loss_a = losses.gan_discriminator_loss(
            real_logits=real_a, fake_logits=fake_a, loss_type=cfg.gan
        )
        loss_b = losses.gan_discriminator_loss(
            real_logits=real_b, fake_logits=fake_b, loss_type=cfg.gan
        )
        extra = {
            "pool_A": pool_a,
            "pool_B": pool_b,
            "pool_count_A": count_a,
            "pool_count_B": count_b,
        }
        return loss_a + loss_b, engine.Out(metrics={"D/A": loss_a, "D/B": loss_b}, extra=extra)


def _split(x, n):
    """``x[:n], x[n:]`` (the second empty when ``x`` has only ``n`` rows)."""
    return x[:n], x[n:]
