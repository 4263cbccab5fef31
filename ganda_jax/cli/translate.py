"""Translate every image of a folder with a trained CycleGAN/DiscoGAN generator.

  python -m ganda_jax.cli.translate --workdir DIR --input IN --output OUT --direction AtoB

Reads ``DIR/config.json`` and the latest checkpoint in ``DIR/checkpoints``;
writes one output per input image under the same file name (no cap on the
number of images), in fixed-size batches so the generator compiles once.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from ganda_jax import engine
from ganda_jax.data import pipeline, sources
from ganda_jax.methods import get_method
from ganda_jax.metrics import image_metrics
from ganda_jax.train import checkpointing, parallel, resume

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_INPUT = flags.DEFINE_string("input", None, "Folder of input images.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the translated images.")
_DIRECTION = flags.DEFINE_enum("direction", "AtoB", ["AtoB", "BtoA"], "Translation direction.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per batch.")
_SIZE = flags.DEFINE_integer(
    "size", 0, "Square size images are resized/cropped to (0: the training image_size)."
)


def load_trained(workdir: str, mesh=None):
    """``(method, params)`` from a workdir's config and latest checkpoint."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    mesh = mesh or parallel.make_mesh()
    method = get_method(config)
    if not hasattr(method, "generate"):
        raise ValueError(f"method {config.method!r} has no image translator")
    tx = engine.make_optimizer(method)
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every=1, async_save=False
    )
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    state, _ = ckpt.restore(resume.abstract_state(method, tx, parallel.replicated(mesh)))
    ckpt.close()
    return method, engine.eval_state(state).params  # the moving average when the run kept one


def translate_folder(
    workdir: str,
    input_dir: str,
    output_dir: str,
    *,
    direction: str = "AtoB",
    batch_size: int = 16,
    size: int = 0,
) -> list[str]:
    mesh = parallel.make_mesh()
    method, params = load_trained(workdir, mesh)
    size = size or method.config.image_size
    folder = sources.FolderSource(input_dir)
    os.makedirs(output_dir, exist_ok=True)
    batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    sharding = parallel.data_sharding(mesh)

    @jax.jit
    def run(params, images):
        return image_metrics.to_uint8(
            method.generate(params, image_metrics.from_uint8(images, jnp.float32), direction)
        )

    written = []
    files = folder.files
    for start in range(0, len(files), batch_size):
        names = files[start : start + batch_size]
        images = np.stack(
            [
                pipeline.center_resize(folder[i]["image"], size=size)
                for i in range(start, start + len(names))
            ]
        )
        if len(names) < batch_size:  # pad the last batch: one shape, one compilation
            images = np.concatenate([images, np.repeat(images[-1:], batch_size - len(names), 0)])
        out = np.asarray(run(params, jax.device_put(images, sharding)))
        for name, image in zip(names, out):
            dest = os.path.join(output_dir, os.path.basename(str(name)))
            Image.fromarray(image).save(dest)
            written.append(dest)
        logging.info("translated %d/%d", len(written), len(files))
    return written


def main(argv):
    del argv
    for flag in (_WORKDIR, _INPUT, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    logging.set_verbosity(logging.INFO)
    written = translate_folder(
        _WORKDIR.value,
        _INPUT.value,
        _OUTPUT.value,
        direction=_DIRECTION.value,
        batch_size=_BATCH.value,
        size=_SIZE.value,
    )
    print(f"wrote {len(written)} images to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
