"""Trains any ganda_jax method.

  python train.py --config=configs/cyclegan.py --workdir=/tmp/cyclegan
  python train.py --config=configs/cyclegan.py:runlocal --config.num_train_steps=10 --workdir=...

Re-running with the same --workdir resumes from its latest checkpoint. The console shows
the trainer's progress and evaluations; --verbose adds the libraries' INFO lines (Orbax, JAX).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ganda_jax.train import trainer, writers

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:variants]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Also log the libraries' INFO lines (Orbax checkpointing, JAX)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    writers.quiet_library_logs(verbose=_VERBOSE.value)
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
