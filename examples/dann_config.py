"""DANN on the embedded digits (examples/dann.py)."""

from ganda_jax import config_lib
from ganda_jax.data import tasks


def get_config(arg=None):
    c = config_lib.base("dann:DANN")  # module:Class, importable (PYTHONPATH=examples)
    c.batch_size, c.num_train_steps, c.image_size = 32, 300, 32
    c.data = tasks.data_block("classify", num_train=2000, num_test=500)  # or your own domains
    c.loss = dict(adv_weight=0.1)
    c.optimizer = dict(F=config_lib.adam(1e-3), D=config_lib.adam(1e-3))
    c.lock()
    return c
