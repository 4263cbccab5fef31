"""Calibrate the synthetic ``digits`` domain-adaptation pair.

Trains the same small CNN (2 conv layers + dense, Adam) twice -- once on
source train, once on target train -- and evaluates both on source test and
target test.  A well-calibrated pair has a large gap:

* source -> target test accuracy roughly 30-60 % (adaptation needed), while
* target -> target test accuracy > 90 % (the target task is learnable).

Usage::

    /tmp/venv/bin/python benchmarks/calibrate_digits.py --steps 1500 --seed 0 \\
        --json /tmp/calibrate_digits.json

Self-contained: only ``ganda_jax.data.synthetic`` is imported from the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ganda_jax.data import synthetic


class SmallCNN(nn.Module):
    """conv3x3(16) -> pool -> conv3x3(32) -> pool -> dense(128) -> dense(10).

    Deliberately small so that 2 x 1500 Adam steps run in a couple of minutes
    on two CPU cores.
    """

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def _prep(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def train(images, labels, *, steps: int, batch: int, lr: float, seed: int, log_every: int = 250):
    """Trains SmallCNN with Adam on (images, labels); returns (model, params)."""
    model = SmallCNN()
    key = jax.random.PRNGKey(seed)
    params = model.init(key, jnp.zeros((1,) + images.shape[1:], jnp.float32))
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    x_all = jnp.asarray(_prep(images))
    y_all = jnp.asarray(labels)
    n = x_all.shape[0]

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # A plain jitted step driven from Python: on XLA:CPU, convolutions inside a
    # lax.scan body are dramatically slower than the same step called in a loop.
    # The dataset is passed as an argument (not closed over) so it is not baked
    # into the compiled program as a constant.
    @jax.jit
    def step(params, opt_state, x_all, y_all, idx):
        loss, g = jax.value_and_grad(loss_fn)(params, x_all[idx], y_all[idx])
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(1, steps + 1):
        idx = rng.integers(0, n, batch)
        params, opt_state, loss = step(params, opt_state, x_all, y_all, idx)
        losses.append(loss)
        if i % log_every == 0 or i == steps:
            print(f"    step {i:5d}  loss {float(jnp.mean(jnp.stack(losses))):.4f}", flush=True)
            losses = []
    return model, params


def accuracy(model, params, images, labels, batch: int = 500) -> float:
    apply = jax.jit(model.apply)
    correct = 0
    for s in range(0, len(images), batch):
        logits = apply(params, jnp.asarray(_prep(images[s : s + batch])))
        correct += int((np.asarray(logits).argmax(-1) == labels[s : s + batch]).sum())
    return correct / len(images)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=1500, help="Adam steps per model")
    ap.add_argument("--seed", type=int, default=0, help="data and init seed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-train", type=int, default=20000)
    ap.add_argument("--num-test", type=int, default=5000)
    ap.add_argument("--json", type=str, default=None, help="write results to this JSON file")
    ap.add_argument(
        "--decompose",
        action="store_true",
        help="also train on the two hybrids (source strokes in the target's look; target strokes "
        "in the source's look) to split the gap into appearance and geometry",
    )
    args = ap.parse_args(argv)
    if args.decompose:
        return decompose(args)

    t0 = time.time()
    data = {}
    for dom in ("source", "target"):
        for split, num in (("train", args.num_train), ("test", args.num_test)):
            data[dom, split] = synthetic.digits(domain=dom, split=split, num=num, seed=args.seed)
    t_data = time.time() - t0
    print(f"generated data in {t_data:.1f}s")

    results = {}
    for train_dom in ("source", "target"):
        print(f"training on {train_dom} train ({args.steps} steps)")
        t1 = time.time()
        d = data[train_dom, "train"]
        model, params = train(
            d["image"], d["label"], steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed
        )
        for test_dom in ("source", "target"):
            t = data[test_dom, "test"]
            results[f"{train_dom}->{test_dom}"] = accuracy(model, params, t["image"], t["label"])
        print(f"  done in {time.time() - t1:.1f}s")

    print()
    print(f"{'trained on':<12}{'source test':>13}{'target test':>13}")
    for train_dom in ("source", "target"):
        print(
            f"{train_dom:<12}{results[f'{train_dom}->source']:>13.4f}{results[f'{train_dom}->target']:>13.4f}"
        )
    ok = 0.30 <= results["source->target"] <= 0.60 and results["target->target"] > 0.90
    print(
        f"\ncalibration {'OK' if ok else 'OUT OF RANGE'} "
        f"(want 0.30 <= source->target <= 0.60 and target->target > 0.90)"
    )
    print(f"total {time.time() - t0:.1f}s")

    if args.json:
        out = dict(
            vars(args),
            accuracy=results,
            calibrated=ok,
            seconds=time.time() - t0,
            data_seconds=t_data,
            jax_backend=jax.default_backend(),
        )
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return results


# Geometry keys of synthetic._DIGIT_STYLES (the rest is appearance: level, textures, ink, noise).
_GEOMETRY = ("wobble", "height", "aspect", "shear", "rotate", "shift", "half_width")


def _hybrid(domain: str, geometry_of: str, **kw) -> dict:
    """Digits drawn with ``geometry_of``'s stroke geometry in ``domain``'s appearance."""
    styles = synthetic._DIGIT_STYLES
    saved = dict(styles[domain])
    styles[domain].update({k: styles[geometry_of][k] for k in _GEOMETRY})
    try:
        return synthetic.digits(domain=domain, **kw)
    finally:
        styles[domain].clear()
        styles[domain].update(saved)


def decompose(args):
    """Target-test accuracy of the CNN trained on each (geometry, appearance) combination.

    Pixel-level adaptation (PixelDA, CyCADA's pixel stage) restyles source images: at best it
    gives the "source geometry, target look" row; the rest of the gap is the strokes' shape.
    """
    t0 = time.time()
    kw = dict(num=args.num_train, split="train", seed=args.seed)
    train_sets = {
        "source geometry, source look (source-only)": synthetic.digits(domain="source", **kw),
        "source geometry, target look (perfect restyling)": _hybrid("target", "source", **kw),
        "target geometry, source look": _hybrid("source", "target", **kw),
        "target geometry, target look (oracle)": synthetic.digits(domain="target", **kw),
    }
    test = synthetic.digits(domain="target", split="test", num=args.num_test, seed=args.seed)
    results = {}
    for name, d in train_sets.items():
        print(f"training on {name} ({args.steps} steps)")
        model, params = train(
            d["image"], d["label"], steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed
        )
        results[name] = accuracy(model, params, test["image"], test["label"])
    print(f"\n{'trained on':<52}{'target test':>12}")
    for name, acc in results.items():
        print(f"{name:<52}{acc:>12.4f}")
    print(f"total {time.time() - t0:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), target_accuracy=results), f, indent=2)
    return results


if __name__ == "__main__":
    main()
