"""One process of a multi-process training job, launched by tests/test_distributed.py.

    python tests/distributed_worker.py WORKDIR OUT_PREFIX MAX_STEPS [MAX_STEPS ...]

The environment describes the job (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu``, ``JAX_NUM_CPU_DEVICES``); ``trainer.train``
initialises ``jax.distributed`` from it. For each MAX_STEPS in turn, trains (or resumes)
:func:`config` in WORKDIR up to that step and writes every leaf of the returned state to
``OUT_PREFIX_<MAX_STEPS>.npz`` (a MAX_STEPS equal to the checkpointed step just restores).
At the end ``OUT_PREFIX.json`` holds the process index and count and the scalars that this
process logged at every step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def config():
    """The tiny CycleGAN of the test (shared with its single-process reference).

    ``runlocal`` at batch 8, as tests/test_engine.py, so the 8-device programs are the same.
    """
    spec = importlib.util.spec_from_file_location(
        "configs_cyclegan", os.path.join(ROOT, "configs", "cyclegan.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("runlocal").unlock()
    cfg.batch_size = 8
    cfg.log_every_steps = 1  # every step's losses, not averages
    cfg.checkpoint_every_steps = 1  # every state, for the step-by-step reference
    cfg.keep_checkpoints = 100
    cfg.data.num_threads = 1  # the processes share the test machine's cores
    return cfg


def state_leaves(state) -> dict:
    """``{path: numpy array}`` of every leaf of a train state (replicated, so local)."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _exit_with_parent() -> None:
    """Exits when the launching test process is gone, so a killed test leaves no orphans."""
    # The test passes its pid: one that died before this line ran is caught too.
    parent = int(os.environ.get("GANDA_TEST_PARENT_PID", os.getppid()))

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(workdir: str, out_prefix: str, max_steps: list[int]) -> None:
    _exit_with_parent()
    import jax
    import numpy as np

    from ganda_jax.train import trainer, writers

    # Every process records the scalars the loop computes (the writer itself writes only
    # on process 0), so the test can compare what each process saw.
    seen: dict[int, dict[str, float]] = {}
    write_scalars = writers.MetricWriter.write_scalars

    def recording_write_scalars(self, step, scalars):
        seen.setdefault(int(step), {}).update(
            {k: float(v) for k, v in scalars.items() if not k.startswith("perf/")}
        )
        return write_scalars(self, step, scalars)

    writers.MetricWriter.write_scalars = recording_write_scalars
    for n in max_steps:
        state = trainer.train(config(), workdir, max_steps=n)
        np.savez(f"{out_prefix}_{n}.npz", **state_leaves(state))
    with open(out_prefix + ".json", "w") as f:
        json.dump(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "metrics": {str(k): v for k, v in sorted(seen.items())},
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]])
