"""Images per second the input pipeline delivers on this host, per source.

  python benchmarks/input_pipeline.py --json input.json
  python benchmarks/input_pipeline.py --image-size 256 --load-size 286 --batch-size 8 --threads 0 4 8

Sources: ``embedded`` (in-memory synthetic translation pair), ``npz`` (the same
arrays through an ``.npz`` file) and ``folder`` (JPEG files in the CycleGAN
layout, decoded, resized to ``--load-size``, randomly cropped and flipped, as
CycleGAN trains on them). Each is read through the trainer's
:class:`ganda_jax.data.pipeline.Loader` (two streams A and B, so one step yields
``2 x batch`` images) with 0 (serial) or N worker threads, after one warm-up
batch. Compare the numbers with ``benchmarks/throughput.py``'s images/s for the
same setting: the input keeps up when it delivers more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ganda_jax.data import pipeline, sources, synthetic  # noqa: E402


def write_sources(root: str, num: int, size: int) -> dict[str, dict]:
    """The embedded pair in memory, as ``.npz`` files and as JPEG folders."""
    pair = synthetic.translation_pair(split="train", num=num, seed=0, size=size)
    for d in ("A", "B"):
        np.savez(os.path.join(root, f"{d}.npz"), images=pair[d])
        folder = os.path.join(root, "folder", f"train{d}")
        os.makedirs(folder)
        for i, image in enumerate(pair[d]):
            Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return {
        "embedded": {d: sources.ArraySource({"image": pair[d]}) for d in ("A", "B")},
        "npz": {d: sources.NpzSource(os.path.join(root, f"{d}.npz")) for d in ("A", "B")},
        "folder": sources.cyclegan_folder(os.path.join(root, "folder"), "train"),
    }


def measure(streams, *, batch_size, threads, steps, transform) -> float:
    loader = pipeline.Loader(
        streams,
        global_batch_size=batch_size,
        seed=0,
        transforms=transform,
        num_threads=threads,
        process_index=0,
        process_count=1,
    )
    try:
        loader.batch(0)  # warm-up: thread pool, page cache
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            loader.batch(step)
        dt = time.perf_counter() - t0
    finally:
        loader.close()
    return steps * batch_size * len(streams) / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image-size", type=int, default=128, help="stored image side")
    p.add_argument("--load-size", type=int, default=0, help="folder: resize to this before crop")
    p.add_argument("--crop-size", type=int, default=0, help="crop side (default: image size)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[0, 4])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    crop = args.crop_size or args.image_size
    load = args.load_size or args.image_size
    augment = pipeline.image_transform(
        pipeline.resize_crop_flip, load_size=load, crop_size=crop, flip=True
    )
    rows = []
    with tempfile.TemporaryDirectory() as root:
        all_streams = write_sources(root, args.num_images, args.image_size)
        for name, streams in all_streams.items():
            # Files are augmented as in training; in-memory data is used as is.
            transform = augment if name == "folder" else None
            for threads in args.threads:
                ips = measure(
                    streams,
                    batch_size=args.batch_size,
                    threads=threads,
                    steps=args.steps,
                    transform=transform,
                )
                rows.append(
                    dict(
                        source=name,
                        image_size=args.image_size,
                        output_size=crop if name == "folder" else args.image_size,
                        batch_size=args.batch_size,
                        threads=threads,
                        images_per_s=ips,
                    )
                )
    print("| source | stored size | output size | batch | threads | images/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['source']} | {r['image_size']} | {r['output_size']} | {r['batch_size']} "
            f"| {r['threads']} | {r['images_per_s']:.0f} |"
        )
    if args.json:
        meta = dict(machine=platform.platform(), cpus=os.cpu_count(), date=time.strftime("%F"))
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
