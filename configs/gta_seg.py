"""GTA for segmentation (Sankaranarayanan et al. 2018; reference code LSD-seg).

  python train.py --config=configs/gta_seg.py --workdir=/tmp/gta_seg
  python train.py --config=configs/gta_seg.py:runlocal --workdir=/tmp/gta_seg_tiny
  python train.py --config=configs/gta_seg.py:tfds --config.data.source_domain.name=gta5 \\
      --config.data.data_dir=DIR --workdir=...   # prepared tfds data, reference setting

Default: the embedded segmentation pair (64x64, 5 classes; flat-coloured
source scenes -> re-coloured, textured, lit, noisy target scenes) with
CPU-sized networks: F = 3 VGG stages (8, 16, 32 filters, 2 convs each) and
32-channel fc6/fc7 (3x3 fc6), G with ngf=4 and one residual block per stage, D
with 16 filters, 3 stages of one residual block; 3000 steps evaluated with
averaged weights (``ema_decay`` 0.998; the reference evaluates its last iterate).

``paper``: the reference code's networks and hyper-parameters (LSD-seg
code/train.py, trainer_LSD.py, fcn8s_LSD.py): F = VGG-16 (5 stages, fc 4096,
fc6 7x7, dropout 0.5), G with ngf=64 and 2 blocks per stage, D with 128
filters and 3 x 3 blocks, dropout 0.5 in G's and D's blocks; Adam(1e-5,
b1=0.9) for F and C, Adam(1e-4, b1=0.7) for G and D, batch 1, 100k steps;
loss weights as the reference's. Not reproduced: the ImageNet-pretrained
VGG-16 initialisation of F and the double learning rate of F's biases.
``tfds``: prepared tfds data (never downloaded), the reference setting: source
``data.source_domain.name`` (a GTA5- or SYNTHIA-like builder you prepared, labels in
Cityscapes label ids), target ``cityscapes/semantic_segmentation`` (its
labelled ``validation`` split is the test split), 19 classes, images resized
to a shorter side of 320 and cropped to 320x320 (the reference: whole
640x320 frames). Implies ``paper``.
"""

from ganda_jax import config_lib
from ganda_jax.data import tasks

VARIANTS = {"runlocal", "paper", "tfds"}

# benchmarks/throughput.py: the reference-size variant (and overrides), the PyTorch reference
# model (../shared/bench/torch_ref.py --model) and the reference (image size, batch) settings.
BENCHMARK = dict(variant="paper", torch=None, settings=[(None, None)])  # the config's size


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, VARIANTS)
    c = config_lib.base("gta_seg")
    c.batch_size = 8
    # 3000 steps, averaged weights (as GTA's digits config): mIoU at 1500 is far from settled
    # (docs/adaptation.md).
    c.num_train_steps = 3000
    c.ema_decay = 0.998
    c.image_size = 64
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.eval_batch_size = 200
    c.data = tasks.data_block("segment", num_train=4000, num_test=500)
    c.model = {
        "f_features": (8, 16, 32),
        "f_convs": (2, 2, 2),
        "f_fc": 32,
        "f_fc_kernel": 3,
        "f_dropout": 0.0,
        "ngf": 4,
        "g_blocks": 1,
        "g_dropout": 0.5,
        "d_features": 16,
        "d_stages": 3,
        "d_blocks": 1,
        "d_dropout": 0.5,
    }
    c.loss = {
        "seg_weight": 1.0,  # L_seg on C(F(x_s))
        "aux_D": 1.0,  # D's segmentation head on real source
        "adv_G": 0.1,  # within-domain adversarial, G
        "aux_G": 1.0,  # D's segmentation head on G(F(x_s)), G
        "rec": 1.0,  # L1 reconstruction, G
        "adv_F": 0.1,  # cross-domain adversarial, F
        "aux_F": 0.1,  # D's segmentation head on G(F(x_s)), F
    }
    c.optimizer = {
        "F": config_lib.adam(1e-3, 0.9, 0.999),
        "G": config_lib.adam(2e-4, 0.7, 0.999),
        "D": config_lib.adam(2e-4, 0.7, 0.999),
    }

    if variants & {"paper", "tfds"}:
        c.batch_size = 1
        c.num_train_steps = 100_000
        c.ema_decay = 0.0  # the reference evaluates its last iterate
        c.checkpoint_every_steps = 5000
        c.log_every_steps = 500
        c.eval_batch_size = 16
        c.model.update(
            f_features=(64, 128, 256, 512, 512),
            f_convs=(2, 2, 3, 3, 3),
            f_fc=4096,
            f_fc_kernel=7,
            f_dropout=0.5,
            ngf=64,
            g_blocks=2,
            d_features=128,
            d_blocks=3,
        )
        c.optimizer.F.learning_rate = 1e-5
        for group in ("G", "D"):
            c.optimizer[group].learning_rate = 1e-4
    if "tfds" in variants:
        c.image_size = 320
        c.data.source_domain.update(  # .name: set, a prepared GTA5 / SYNTHIA builder
            kind="tfds",
            image_key="image",
            label_key="segmentation_label",
            label_map="cityscapes19",
        )
        c.data.target_domain.update(
            kind="tfds",
            name="cityscapes/semantic_segmentation",
            image_key="image_left",
            label_key="segmentation_label",
            label_map="cityscapes19",
            test_split="validation",
        )
        c.data.update(num_classes=19, num_train=0, num_test=0, load_size=320, flip=True)
    if "runlocal" in variants:
        c.batch_size = 4
        c.num_train_steps = 4
        c.image_size = 32
        c.data.num_train, c.data.num_test = 16, 8
        c.model.update(f_features=(4, 4, 8), f_convs=(1, 1, 1), f_fc=8, ngf=2, d_features=4)
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval_batch_size = 8
    c.lock()
    return c
