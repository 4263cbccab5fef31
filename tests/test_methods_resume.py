"""What every method in the registry must do when resumed: two steps in one go, and one step
then a resume in new objects (a new process's worth), give bit-identical states. (Split from
``test_methods.py`` so the two halves run on different test workers.)"""

import pytest
from conftest import METHOD_CASES, equal_trees, load_config, method_config

from ganda_jax.train import parallel, trainer


@pytest.mark.parametrize(
    "case", sorted(c for c in METHOD_CASES if not c.startswith("cycada")) + ["cycada"]
)
def test_resume_is_bit_identical(case, tmp_path):
    """Two steps straight, against one step, a new process's worth of objects, one more.
    CyCADA trains all its stages (two steps each): the resume lands inside the pixel stage,
    after the warm start from the finished pretrain stage."""
    if case == "cycada":
        cfg = load_config("cycada", "runlocal")
        cfg.batch_size, cfg.stage_steps = 4, {"pretrain": 2, "pixel": 2, "feature": 2}
        stop = 3
    else:
        cfg, stop = method_config(case, num_train_steps=2), 1
    cfg.checkpoint_every_steps, cfg.log_every_steps = 100, 1
    mesh = parallel.make_mesh(2)
    straight = trainer.train(cfg, str(tmp_path / "straight"), mesh=mesh)
    first = trainer.train(cfg, str(tmp_path / "resumed"), max_steps=stop, mesh=mesh)
    assert int(first.step) == (1 if case == "cycada" else stop)
    resumed = trainer.train(cfg, str(tmp_path / "resumed"), mesh=mesh)
    assert int(resumed.step) == int(straight.step)
    for field in ("params", "opt_state", "model_state", "extra", "rng"):
        assert equal_trees(getattr(straight, field), getattr(resumed, field)), field
