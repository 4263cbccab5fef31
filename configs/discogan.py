"""DiscoGAN (Kim et al. 2017).

  python train.py --config=configs/discogan.py --workdir=/tmp/discogan
  python train.py --config=configs/discogan.py:runlocal --workdir=/tmp/dg_tiny
  python train.py --config=configs/discogan.py:paper --workdir=...          # embedded data, paper nets
  python train.py --config=configs/discogan.py:folder --config.data.path=DIR --workdir=...
  python train.py --config=configs/discogan.py:folder,paired --config.data.path=DIR --workdir=...
  python train.py --config=configs/discogan.py:horse2zebra --workdir=...     # prepared tfds data

Default: the embedded translation pair (64x64, hidden ground truth) with the
reference U-Net / PatchGAN at a CPU-sized width (ngf=ndf=8 instead of 64).
The paper variants use the reference widths (ngf=ndf=64), 64x64 images resized
without crop or flip, batch 64 and 200 epochs of edges2shoes (49,825 images /
64 = 779 steps per epoch, ~156k steps), constant learning rate.

``folder`` reads ``data.path/{trainA,trainB}`` (the CycleGAN layout); add
``paired`` when ``trainA/x.png`` and ``trainB/x.png`` are the two halves of one
pair (e.g. edges2shoes split into edges and photos) to turn on the pixelwise
translation loss. The paper itself trains edges2shoes unpaired.

``runlocal`` keeps 64 px (the reference's 6-down U-Net needs a side that is a
multiple of 64; ``model.num_downs`` can lower the depth for smaller images) and
shrinks the widths to 4, the data to 16 images and training to 4 steps.
"""

from ganda_jax import config_lib
from ganda_jax.data import tasks

TFDS_SETS = {"horse2zebra", "apple2orange", "summer2winter_yosemite", "monet2photo"}
VARIANTS = {"runlocal", "paper", "folder", "paired"} | TFDS_SETS

# benchmarks/throughput.py: the reference-size variant (and overrides), the PyTorch reference
# model (../shared/bench/torch_ref.py --model) and the reference (image size, batch) settings.
BENCHMARK = dict(variant="paper", torch="discogan", settings=[(64, 64)])


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, VARIANTS)
    c = config_lib.base("discogan")
    c.batch_size = 8
    c.num_train_steps = 800
    c.image_size = 64
    c.log_every_steps = 50
    c.checkpoint_every_steps = 400
    c.data = tasks.data_block("translate", num_train=2000, num_test=200, flip=True)
    c.model = dict(ngf=8, ndf=8, num_downs=6, n_layers_D=3, dropout=0.5)
    c.loss = dict(
        gan="nsgan",  # the paper's standard GAN loss; the PyTorch-GAN reference uses "lsgan"
        recon_distance="l2",  # the paper's; the reference uses "l1"
        lambda_recon=1.0,
        lambda_pixel=1.0,  # only used with data.paired=True
        pixel_distance="l1",  # as the reference
    )
    c.optimizer = dict(
        G=config_lib.adam(2e-4, 0.5, 0.999),
        D=config_lib.adam(2e-4, 0.5, 0.999),
    )

    tfds_sets = variants & TFDS_SETS
    if variants & ({"paper", "folder"} | tfds_sets):
        c.batch_size = 64
        c.num_train_steps = 156_000
        c.checkpoint_every_steps = 5000
        c.log_every_steps = 100
        c.model.ngf = c.model.ndf = 64
        # The reference resizes to 64x64 with no crop and no flip.
        c.data.load_size = c.image_size
        c.data.flip = False
    if tfds_sets:
        name = f"cycle_gan/{tfds_sets.pop()}"
        for d in ("A", "B"):  # splits trainA / testA, trainB / testB
            c.data[d].update(kind="tfds", name=name, train_split=f"train{d}", test_split=f"test{d}")
    if "folder" in variants:  # data.path/{trainA,trainB}: the CycleGAN layout
        c.data.A.kind = c.data.B.kind = "folder"
    if "paired" in variants:
        c.data.paired = True
    if "runlocal" in variants:
        c.batch_size = 2
        c.num_train_steps = 4
        c.data.num_train, c.data.num_test = 16, 8
        c.model.ngf = c.model.ndf = 4
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval_batch_size = 8
    c.lock()
    return c
