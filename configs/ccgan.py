"""CC-GAN (Denton, Gross, Fergus 2016): semi-supervised classification by adversarial in-painting.

  python train.py --config=configs/ccgan.py --workdir=/tmp/ccgan
  python train.py --config=configs/ccgan.py:runlocal --workdir=/tmp/ccgan_tiny
  python train.py --config=configs/ccgan.py:cifar10 --config.data.data_dir=DIR --workdir=...
  python train.py --config=configs/ccgan.py:stl10 --config.data.data_dir=DIR --workdir=...

Default: the embedded textured digits (32x32, ``data.domain.name='target'``), 10
labels per class (100 labelled images) plus 10k unlabelled ones, 16x16 holes,
the low-resolution input of CC-GAN^2 (the full image pooled to 8x8), a
CPU-sized context encoder (ngf=16) and discriminator (16-32-64), batch 32, 1500
steps; about 1-3 minutes on two CPU cores. The baseline ``D_sup`` (same
network, same init, labelled data only) is trained in the same run.

G's adversarial weight is 0.1: at 1 it fools this small D with in-fillings worse
than the mean colour; at 0.01 D learns to spot blurry in-fillings and its class
head gets worse than the baseline. D's class weight 0.3 (relative to its
adversarial term, which has weight 1) lets the in-painting game shape more of
D's features; D_sup's loss has the same weight (Adam makes it nearly
irrelevant there). The settings tried on these digits (G's adversarial weight
0.01/0.1/1, D's class weight 0.3/1, D's learning rate x4, with and without the
low-resolution input) changed D's test accuracy relative to the baseline by -4
to +3 points, with about +-2 points between otherwise equal runs.

``cifar10``: prepared tfds ``cifar10`` (never downloaded) at 32x32, 100 labels
per class from the training split, the whole training split unlabelled, 16 px
holes. ``stl10``: prepared tfds ``stl10`` resized to 64x64, 100 labels per
class from its ``train`` split, its 100k ``unlabelled`` split, 32 px holes, the
low-resolution input of CC-GAN^2 and VGG-style widths. The STL-10 numbers
(64 px, 100 labels per class as in STL-10's folds, 32 px holes) are from memory
of the paper and were not checked against it; the step counts are not the
paper's.
"""

from ganda_jax import config_lib
from ganda_jax.data import tasks

VARIANTS = {"runlocal", "cifar10", "stl10"}

# benchmarks/throughput.py: the reference-size variant (and overrides), the PyTorch reference
# model (../shared/bench/torch_ref.py --model) and the reference (image size, batch) settings.
# No 'paper' variant: 'stl10' has the paper-size networks (the benchmark's batch is
# synthetic, so its tfds data is never read).
BENCHMARK = dict(variant="stl10", torch="ccgan_seed", settings=[(128, 8)])


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, VARIANTS)
    c = config_lib.base("ccgan")
    c.batch_size = 32
    c.num_train_steps = 1500
    c.image_size = 32
    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.eval_batch_size = 500
    c.data = tasks.data_block(
        "semi", num_train=10000, num_test=2000, labels_per_class=10, domain=dict(name="target")
    )
    c.model = dict(
        ngf=16,
        n_down=3,
        lowres_factor=4,  # 4: CC-GAN^2 (the full image pooled by 4 also fed to G); 0: plain CC-GAN
        hole_size=16,
        fill_value=0.0,
        d_features=(16, 32, 64),
        d_convs_per_stage=1,
        norm_D="none",
        dropout_D=0.3,
    )
    c.loss = dict(
        gan="nsgan",  # the paper's log loss; 'lsgan' as the PyTorch-GAN reference
        d_adv_weight=1.0,  # D's real/in-filled term
        class_weight=0.3,  # D's (and D_sup's) cross-entropy on the labelled batch
        adv_weight=0.1,  # G's adversarial term
        rec_weight=1.0,  # G's L2 error inside the hole (context encoder)
    )
    adam = lambda: config_lib.adam(2e-4, 0.5, 0.999)  # noqa: E731
    # D_sup (the baseline) uses D's block: the same hyper-parameters by construction.
    c.optimizer = dict(G=adam(), D=adam())

    if variants & {"cifar10", "stl10"}:
        c.data.domain.update(kind="tfds", name="")
        c.data.num_train = c.data.num_test = 0  # whole splits
        c.data.labels_per_class = 100
        c.num_train_steps = 50_000
        c.checkpoint_every_steps = 5000
        c.eval_every_steps = 5000
        c.model.ngf = 64
        c.model.d_features = (64, 128, 256)
        c.model.d_convs_per_stage = 2
    if "cifar10" in variants:
        c.data.domain.name = "cifar10"
    if "stl10" in variants:
        c.data.domain.name = "stl10"
        c.data.unlabeled_split = "unlabelled"
        c.image_size = 64
        c.model.hole_size = 32
        c.model.n_down = 4
        c.model.lowres_factor = 4
        c.model.d_features = (64, 128, 256, 512)
    if "runlocal" in variants:
        c.batch_size = 4
        c.num_train_steps = 4
        c.data.num_train, c.data.num_test = 32, 16
        c.data.labels_per_class = 1
        c.model.ngf, c.model.n_down, c.model.hole_size = 4, 2, 8
        c.model.lowres_factor = 2  # exercise the CC-GAN^2 input
        c.model.d_features = (4, 8)
        c.model.dropout_D = 0.0  # tested on its own; fewer random draws compile faster
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval_batch_size = 8
    c.lock()
    return c
