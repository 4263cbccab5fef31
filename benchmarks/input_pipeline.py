"""Images per second the input pipeline delivers on this host, per task and kind of data.

  python benchmarks/input_pipeline.py --json input.json
  python benchmarks/input_pipeline.py --task translate --image-size 256 --stored-size 286 --threads 0 4 8

Every row reads a dataset through the one data layer every method uses
(:mod:`ganda_jax.data.tasks`: the training streams and transforms of a config's ``data``
block) and the trainer's :class:`ganda_jax.data.pipeline.Loader`, with 0 (serial) or N
worker threads, after one warm-up batch. Images/s counts every stream's images (two
streams: one step yields ``2 x batch``). The datasets are the embedded ones, and the same
images written to disk at ``--stored-size``:

- ``translate`` (CycleGAN, DiscoGAN): ``embedded`` (in memory, used as is), ``npz``,
  ``folder`` (JPEG, the CycleGAN layout); files are resized, randomly cropped and flipped;
- ``classify`` (PixelDA, CyCADA, GTA) and ``semi`` (CC-GAN): ``embedded``, ``npz`` and
  ``folder`` (PNG class folders, grayscale source); files are resized to ``image_size``;
- ``segment`` (GTA-seg): ``embedded``, ``npz`` (per-pixel labels) and ``folder`` (GTA5's
  images/ + labels/ PNGs, Cityscapes label ids mapped to 19 classes); image and label are
  resized and randomly cropped together.

Compare with ``benchmarks/throughput.py``'s images/s for the same setting: the input
keeps up when it delivers more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ganda_jax.data import pipeline, synthetic, tasks  # noqa: E402

TASKS = ("translate", "classify", "segment")
DEFAULT_SIZES = {"translate": (128, 128), "classify": (32, 28), "segment": (64, 80)}
CITYSCAPES_IDS = np.array([23, 7, 26, 11, 17], np.uint8)  # the scene classes as label ids


def _resize(images, size):
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size))) for x in images])


def write_datasets(task: str, root: str, num: int, stored: int, size: int) -> dict[str, dict]:
    """``{kind: data block}``: the embedded data, and the same images as npz and as folders."""
    blocks = {"embedded": {}}
    if task == "translate":
        pair = synthetic.translation_pair(split="train", num=num, seed=0, size=stored)
        for d in ("A", "B"):
            np.savez(os.path.join(root, f"{d}.npz"), images=pair[d])
            folder = os.path.join(root, "folder", f"train{d}")
            os.makedirs(folder)
            for i, image in enumerate(pair[d]):
                Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        blocks["npz"] = {d: dict(kind="npz", path=os.path.join(root, f"{d}.npz")) for d in "AB"}
        blocks["folder"] = {d: dict(kind="folder", path=os.path.join(root, "folder")) for d in "AB"}
        return blocks
    roles = ("source", "target")
    for role in roles:
        if task == "classify":
            d = synthetic.digits(domain=role, split="train", num=num, seed=0)
            images, labels = _resize(d["image"], stored), d["label"]
        else:
            d = synthetic.segmentation_pair(
                domain=role, split="train", num=num, seed=0, size=stored
            )
            images, labels = d["image"], CITYSCAPES_IDS[d["mask"]]
        npz = os.path.join(root, role, "npz")
        os.makedirs(npz)
        np.savez(os.path.join(npz, "train.npz"), images=images, labels=labels)
        np.savez(os.path.join(npz, "test.npz"), images=images[:8], labels=labels[:8])
        folder = os.path.join(root, role, "folder")
        for split, n in (("train", num), ("test", 8)):
            for i in range(n):
                if task == "classify":
                    sub = os.path.join(folder, split, f"c{labels[i]}")
                    os.makedirs(sub, exist_ok=True)
                    gray = images[i][..., 0] if role == "source" else images[i]
                    Image.fromarray(gray).save(os.path.join(sub, f"{i:05d}.png"))
                else:  # GTA5's layout, a <split>/ level to keep the test split apart
                    for sub, arr in (("images", images[i]), ("labels", labels[i])):
                        os.makedirs(os.path.join(folder, split, sub), exist_ok=True)
                        Image.fromarray(arr).save(os.path.join(folder, split, sub, f"{i:05d}.png"))
    label_map = dict(label_map="cityscapes19") if task == "segment" else {}
    for kind in ("npz", "folder"):
        blocks[kind] = {
            f"{r}_domain": dict(kind=kind, path=os.path.join(root, r, kind), **label_map)
            for r in roles
        }
    return blocks


def measure(task_data, *, batch_size, threads, steps) -> float:
    loader = pipeline.Loader(
        task_data.train_streams(),
        global_batch_size=batch_size,
        seed=0,
        transforms=task_data.train_transforms(),
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
    return steps * batch_size * len(task_data.streams) / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS))
    p.add_argument("--image-size", type=int, default=0, help="output side (default per task)")
    p.add_argument("--stored-size", type=int, default=0, help="side of the files on disk")
    p.add_argument("--num-images", type=int, default=256, help="per domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[0, 4])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for task in args.task:
        size = args.image_size or DEFAULT_SIZES[task][0]
        stored = args.stored_size or DEFAULT_SIZES[task][1]
        embedded_size = {"classify": 32}.get(task, size)  # the digits render 32x32 only
        with tempfile.TemporaryDirectory() as root:
            blocks = write_datasets(task, root, args.num_images, stored, size)
            for kind, domains in blocks.items():
                extra = {"num_classes": 19} if task == "segment" and kind != "embedded" else {}
                data = tasks.data_block(
                    task,
                    num_train=args.num_images,
                    num_test=8,
                    load_size=stored,
                    **extra,
                    **domains,
                )
                out = embedded_size if kind == "embedded" else size
                config = types.SimpleNamespace(data=data, image_size=out)
                task_data = tasks.make(task, config)
                for threads in args.threads:
                    ips = measure(
                        task_data, batch_size=args.batch_size, threads=threads, steps=args.steps
                    )
                    rows.append(
                        dict(
                            task=task,
                            kind=kind,
                            stored_size=out if kind == "embedded" else stored,
                            output_size=out,
                            batch_size=args.batch_size,
                            threads=threads,
                            images_per_s=ips,
                        )
                    )
    print("| task | kind | stored size | output size | batch | threads | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['kind']} | {r['stored_size']} | {r['output_size']} "
            f"| {r['batch_size']} | {r['threads']} | {r['images_per_s']:.0f} |"
        )
    if args.json:
        meta = dict(machine=platform.platform(), cpus=os.cpu_count(), date=time.strftime("%F"))
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
