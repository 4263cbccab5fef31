"""Where a translation run loses PSNR on the embedded pair: its A->B error by region.

Loads a finished CycleGAN or DiscoGAN workdir (its latest checkpoint; the averaged weights
when the run kept them), translates the embedded test split's A images and breaks the squared
error against the hidden truth down by region of the scene (sky, ground, bush, light fur,
dark fur bands, the 1-px animal outline), next to the same breakdown for the mean-image
baseline (the mean training image of B). Also counts animals whose stripes come out in phase
(light fur brighter than the bands) or inverted. Prints a table and writes JSON::

    python benchmarks/translation_errors.py --workdir /tmp/cyclegan --json /tmp/errors.json

Only for the embedded pair (``data.A.kind == data.B.kind == 'embedded'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ganda_jax.cli.translate import load_trained
from ganda_jax.data import synthetic
from ganda_jax.metrics import evaluation, image_metrics, translation_eval
from ganda_jax.train import parallel


def _breakdown(pred: np.ndarray, truth: np.ndarray, regions: dict) -> dict:
    err = ((pred - truth) ** 2).mean(-1)  # [N, H, W], images in [-1, 1]
    rows = {
        name: {
            "pixels": float(m.mean()),
            "mse": float(err[m].mean()),
            "share_of_error": float(err[m].sum() / err.sum()),
        }
        for name, m in regions.items()
    }
    return {"psnr": float(image_metrics.psnr(x=pred, y=truth)), "regions": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    mesh = parallel.make_mesh()
    method, params = load_trained(args.workdir, mesh)
    if method.data_task != "translate":
        raise SystemExit(f"{args.workdir}: a {method.name} run, not a translation run")
    test = method.data.paired_test()  # None unless both domains are the embedded pair
    if test is None:
        raise SystemExit(f"{args.workdir}: not a run on the embedded translation pair")
    c = method.config
    n, size, seed = len(test["A"]), c.image_size, c.data.seed
    b = image_metrics.from_uint8(test["B"], np.float32)
    fake = evaluation.batched_apply(
        translation_eval.make_translate_fn(method.generate),
        params,
        test,
        mesh=mesh,
        batch_size=c.eval_batch_size,
    )["fake_B"]
    mean = image_metrics.from_uint8(method.data.train_mean("B"), np.float32)
    regions = synthetic.translation_test_regions(num=n, seed=seed, size=size)
    animal = regions.pop("animal")
    out = {
        "workdir": args.workdir,
        "translation": _breakdown(fake, b, regions),
        "mean_image": _breakdown(np.broadcast_to(mean, b.shape), b, regions),
    }
    lum = fake.mean(-1)
    in_phase = inverted = 0
    for i in range(n):  # per animal: is its light fur brighter than its bands?
        for j in np.unique(animal[i][animal[i] >= 0]):
            light = regions["fur_light"][i] & (animal[i] == j)
            band = regions["fur_band"][i] & (animal[i] == j)
            if light.sum() > 5 and band.sum() > 5:
                brighter = lum[i][light].mean() > lum[i][band].mean()
                in_phase, inverted = in_phase + int(brighter), inverted + int(not brighter)
    out["animals_in_phase"], out["animals_inverted"] = in_phase, inverted

    print(
        f"A->B PSNR: translation {out['translation']['psnr']:.2f} dB, mean image "
        f"{out['mean_image']['psnr']:.2f} dB; stripes in phase {in_phase}, inverted {inverted}"
    )
    print("| region | pixels | MSE translation | MSE mean image | share of error, translation |")
    print("|---|---|---|---|---|")
    for name in regions:
        t, m = out["translation"]["regions"][name], out["mean_image"]["regions"][name]
        print(
            f"| {name} | {t['pixels']:.3f} | {t['mse']:.3f} | {m['mse']:.3f} | {t['share_of_error']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
