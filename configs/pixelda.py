"""PixelDA (Bousmalis et al. 2017).

  python train.py --config=configs/pixelda.py --workdir=/tmp/pixelda
  python train.py --config=configs/pixelda.py:runlocal --workdir=/tmp/pixelda_tiny
  python train.py --config=configs/pixelda.py:mnist --config.data.target_domain.name=mnist_m \\
      --config.data.data_dir=DIR --workdir=...   # prepared tfds data, paper setting

Default: the embedded digits pair (32x32; clean source strokes -> textured,
slanted, bent target strokes) with a CPU-sized generator (ngf=16, 4 residual
blocks) and discriminator (ndf=32), the paper's task classifier, batch 32.

``paper``: the paper's network (64 filters, 6 residual blocks, ndf=64) and the
authors' TensorFlow hyper-parameters (hparams.py): Adam(1e-3, b1=0.5), gradient
norm clipped at 5, batch 32, all loss weights 1. Their lr x0.95 every 20k
steps is left out (constant lr); the step count is not given by the paper.
``mnist``: tfds ``mnist`` -> a prepared tfds target (a target with the same 10
classes that you prepared, e.g. an ``mnist_m`` builder, as ``data.target_domain.name``),
paper setting.
"""

from ganda_jax import config_lib
from ganda_jax.data import tasks

VARIANTS = {"runlocal", "paper", "mnist"}

# benchmarks/throughput.py: the reference-size variant (and overrides), the PyTorch reference
# model (../shared/bench/torch_ref.py --model) and the reference (image size, batch) settings.
BENCHMARK = dict(variant="paper", torch="pixelda", settings=[(32, 64)])


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, VARIANTS)
    c = config_lib.base("pixelda")
    c.batch_size = 32
    c.num_train_steps = 1000
    c.image_size = 32
    c.log_every_steps = 100
    c.checkpoint_every_steps = 500
    c.eval_batch_size = 500
    c.data = tasks.data_block("classify", num_train=10000, num_test=2000)
    c.model = dict(
        ngf=16,
        n_blocks=4,
        noise_dim=10,
        noise_channels=1,
        ndf=32,
        n_layers_D=3,
        norm_D="instance",
        t_features=(32, 48),
        t_hidden=(100, 100),
    )
    c.loss = dict(
        gan="nsgan",  # the paper's log loss; 'lsgan' as the PyTorch-GAN reference
        discriminator_weight=1.0,
        style_weight=1.0,
        task_weight=1.0,
    )
    adam = lambda: config_lib.adam(2e-4, 0.5, 0.999)  # noqa: E731
    c.optimizer = dict(G=adam(), D=adam(), T=adam())  # T_src, T_oracle: copies of T

    if variants & {"paper", "mnist"}:
        c.num_train_steps = 100_000
        c.checkpoint_every_steps = 5000
        c.model.ngf = c.model.ndf = 64
        c.model.n_blocks = 6
        for group in c.optimizer.values():
            group.learning_rate = 1e-3
            group.grad_clip_norm = 5.0
    if "mnist" in variants:
        c.data.source_domain.update(kind="tfds", name="mnist")
        c.data.target_domain.kind = "tfds"  # set .name: a prepared target, e.g. mnist_m
        c.data.num_train = c.data.num_test = 0  # whole splits
    if "runlocal" in variants:
        c.batch_size = 4
        c.num_train_steps = 4
        c.data.num_train, c.data.num_test = 32, 16
        c.model.ngf, c.model.n_blocks, c.model.ndf = 4, 1, 4
        c.model.t_features, c.model.t_hidden = (4, 4), (8,)
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.eval_batch_size = 8
    c.lock()
    return c
