"""CycleGAN (Zhu et al. 2017).

  python train.py --config=configs/cyclegan.py --workdir=/tmp/cyclegan
  python train.py --config=configs/cyclegan.py:runlocal --workdir=/tmp/cg_tiny
  python train.py --config=configs/cyclegan.py:horse2zebra --workdir=...  # prepared tfds data
  python train.py --config=configs/cyclegan.py:folder --config.data.path=DIR --workdir=...

Default: the embedded translation pair (64x64, hidden ground truth) with a
CPU-sized network (ngf=ndf=16, 6 residual blocks; the official block count for
128 px images, at a quarter of the width). The paper variants use the paper's network
(ngf=ndf=64, 9 blocks), 256x256 crops of 286 px resizes, batch 1, 200 epochs
(100 constant + 100 linear decay).
"""

from ganda_jax import config_lib
from ganda_jax.data import tasks

VARIANTS = {
    "runlocal",
    "paper",
    "horse2zebra",
    "monet2photo",
    "summer2winter_yosemite",
    "apple2orange",
    "folder",
}

# benchmarks/throughput.py: the reference-size variant (and overrides), the PyTorch reference
# model (../shared/bench/torch_ref.py --model) and the reference (image size, batch) settings.
BENCHMARK = dict(variant="paper", torch="cyclegan_junyanz", settings=[(256, 1), (128, 4)])


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, VARIANTS)
    c = config_lib.base("cyclegan")
    c.batch_size = 4
    c.num_train_steps = 600
    c.image_size = 64
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.data = tasks.data_block("translate", num_train=2000, num_test=200)
    # remat: recompute each network's activations in the backward pass instead of storing
    # them (about a third more FLOPs; the G phase's stored activations at 512 px, batch 1:
    # 11.9 GiB -> 0.13 GiB); for high resolutions on accelerators.
    c.model = dict(ngf=16, ndf=16, n_blocks=6, n_layers_D=3, norm="instance", remat=False)
    c.loss = dict(
        gan="lsgan",
        lambda_A=10.0,
        lambda_B=10.0,
        lambda_identity=0.5,
        cycle_distance="l1",
        pool_size=50,
    )
    c.optimizer = dict(
        G=config_lib.adam(2e-4, 0.5, 0.999, schedule="linear_decay"),
        D=config_lib.adam(2e-4, 0.5, 0.999, schedule="linear_decay"),
    )

    tfds_sets = variants & {"horse2zebra", "monet2photo", "summer2winter_yosemite", "apple2orange"}
    if variants & ({"paper", "folder"} | tfds_sets):
        # The paper's setting: 256 crops of 286 resizes, batch 1, 9 blocks, 200 epochs
        # of ~1000 images = 200k steps (100k constant + 100k linear decay).
        c.image_size = 256
        c.batch_size = 1
        c.num_train_steps = 200_000
        c.checkpoint_every_steps = 5000
        c.log_every_steps = 100
        c.model.ngf = c.model.ndf = 64
        c.model.n_blocks = 9
        c.data.load_size = 286
    if tfds_sets:
        name = f"cycle_gan/{tfds_sets.pop()}"
        for d in ("A", "B"):  # splits trainA / testA, trainB / testB
            c.data[d].update(kind="tfds", name=name, train_split=f"train{d}", test_split=f"test{d}")
    if "folder" in variants:  # data.path/{trainA,trainB}: the CycleGAN layout
        c.data.A.kind = c.data.B.kind = "folder"
    if "runlocal" in variants:
        c.batch_size = 2
        c.num_train_steps = 4
        c.image_size = min(c.image_size, 32)
        c.data.load_size = 36 if c.data.load_size else 0
        c.data.num_train, c.data.num_test = 16, 8
        c.model.ngf = c.model.ndf = 4
        c.model.n_blocks = 1
        c.loss.pool_size = 4
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval_batch_size = 8
    c.lock()
    return c
