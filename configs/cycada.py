"""CyCADA (Hoffman et al. 2018): pretrain f_S -> pixel-level CycleGAN -> feature-level f_T.

  python train.py --config=configs/cycada.py --workdir=/tmp/cycada   # all stages
  python train.py --config=configs/cycada.py:runlocal --workdir=/tmp/cycada_tiny
  python train.py --config=configs/cycada.py --config.stage=pixel --workdir=/tmp/cycada
  python train.py --config=configs/cycada.py:svhn_mnist --config.data.data_dir=DIR --workdir=...
  python train.py --config=configs/cycada.py:seg --workdir=/tmp/cycada_seg

Every stage runs in ``workdir/<stage>`` (its own checkpoints, metrics.jsonl,
samples) and warm-starts from the earlier stages' final checkpoints there
(or from ``pretrain_workdir`` / ``pixel_workdir`` when set). ``stage='all'``
trains pretrain, pixel and feature in order; a re-run skips finished stages and
resumes the interrupted one. The step count of each stage is
``stage_steps.<stage>``; ``num_train_steps`` is their sum (set the stages').
The final scores are in ``workdir/feature/metrics.jsonl``.

Default: the embedded digits pair (32x32; clean grey strokes -> slanted, bent
strokes over colour textures), a CPU-sized CycleGAN and task network, all
three stages in about 10 minutes on a 2-core CPU.

``paper``: the reference's SVHN->MNIST settings (jhoffman/cycada_release):
DTN task network (conv 64-128-256, fc 512, BatchNorm, dropout), f_S with
Adam(1e-4, 0.9, 0.999), batch 128, 100 epochs of SVHN; CycleGAN with
``lambda_A = lambda_B = 1``, no identity loss, LSGAN, batch 100,
Adam(2e-4, 0.5, 0.999), ngf = ndf = 64 and 3-layer PatchGAN; feature stage
with the ADDA discriminator 500-500, Adam(1e-5, 0.9, 0.999), batch 128, 200
epochs. The pixel stage's length and the reference's generator depth were not
checked (50k steps and 9 blocks here); the reference's ``2x`` weight on the
G_st adversarial term is ``loss.adv_weight_st=2`` (left at the paper's 1).
``svhn_mnist``: tfds ``svhn_cropped`` -> ``mnist`` with the paper setting.
``usps_mnist``: ``usps`` (a tfds builder you prepared: not checked whether the
tfds catalogue has one) -> ``mnist``, paper setting.
``seg``: the embedded segmentation pair (5 classes; 32x32 here to stay
CPU-sized) with a small FCN; reports ``eval/miou`` vs ``eval/source_only_miou``.
"""

from ganda_jax import config_lib
from ganda_jax.data import tasks

VARIANTS = {"runlocal", "paper", "svhn_mnist", "usps_mnist", "seg"}

# benchmarks/throughput.py: the reference-size variant (and overrides), the PyTorch reference
# model (../shared/bench/torch_ref.py --model) and the reference (image size, batch) settings.
BENCHMARK = dict(
    variant="paper", overrides={"stage": "pixel"}, torch="cycada_img", settings=[(32, 100)]
)


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, VARIANTS)
    c = config_lib.base("cycada")
    c.stage = "all"  # 'pretrain' | 'pixel' | 'feature' | 'all'
    c.task = "classify"  # 'classify' (digits) | 'segment'
    c.pretrain_workdir = ""  # '': workdir/pretrain
    c.pixel_workdir = ""  # '': workdir/pixel
    c.stage_steps = {"pretrain": 400, "pixel": 800, "feature": 600}
    c.stage_batch_size = {"pretrain": 0, "pixel": 16, "feature": 0}  # 0: batch_size
    c.batch_size = 32
    c.image_size = 32
    c.log_every_steps = 100
    c.checkpoint_every_steps = 500
    c.eval_batch_size = 500
    c.data = tasks.data_block("classify", num_train=10000, num_test=2000)
    c.model = {
        # CycleGAN (names as configs/cyclegan.py; A = source, B = target)
        "ngf": 8,
        "ndf": 16,
        "n_blocks": 2,
        "n_layers_D": 3,
        "norm": "instance",
        "remat": False,  # recompute the CycleGAN networks' activations (configs/cyclegan.py)
        # task network (f_S, f_T and the baselines)
        "t_features": (16, 32, 64),
        "t_conv_dropout": (0.1, 0.3, 0.5),
        "t_hidden": 128,
        "t_dropout": 0.5,
        "t_norm": "batch",
        # feature-level discriminator on phi = 'logits' | 'penultimate'
        "feature": "logits",
        "d_feat_hidden": (500, 500),
    }
    c.loss = {
        # pixel stage: CycleGAN terms (ganda_jax.methods.cyclegan) + semantic consistency
        "gan": "lsgan",
        "lambda_A": 10.0,
        "lambda_B": 10.0,
        "lambda_identity": 0.0,
        "cycle_distance": "l1",
        "pool_size": 50,
        "adv_weight_st": 1.0,
        "semantic_weight": 1.0,
        # the paper's p(f_S, x_s); 'ground_truth': the reference's true source labels
        "semantic_source_labels": "predicted",
        # feature stage
        "feature_gan": "nsgan",
        "feature_weight": 1.0,
        "task_weight": 1.0,
    }
    adam = config_lib.adam
    c.optimizer = {
        "f_S": adam(1e-3, 0.9, 0.999),
        "G": adam(2e-4, 0.5, 0.999),
        "D": adam(2e-4, 0.5, 0.999),
        "f_T": adam(1e-4, 0.9, 0.999),
        "D_feat": adam(1e-4, 0.9, 0.999),
    }

    if variants & {"paper", "svhn_mnist", "usps_mnist"}:
        c.stage_steps = {"pretrain": 57_000, "pixel": 50_000, "feature": 94_000}
        c.stage_batch_size = {"pretrain": 128, "pixel": 100, "feature": 128}
        c.batch_size = 128
        c.checkpoint_every_steps = 5000
        c.log_every_steps = 500
        c.model.ngf = c.model.ndf = 64
        c.model.n_blocks = 9
        c.model.t_features, c.model.t_hidden = (64, 128, 256), 512
        c.loss.lambda_A = c.loss.lambda_B = 1.0
        c.optimizer.f_S = adam(1e-4, 0.9, 0.999)
        c.optimizer.f_T = adam(1e-5, 0.9, 0.999)
        c.optimizer.D_feat = adam(1e-5, 0.9, 0.999)
    if variants & {"svhn_mnist", "usps_mnist"}:
        source = "svhn_cropped" if "svhn_mnist" in variants else "usps"
        c.data.source_domain.update(kind="tfds", name=source)
        c.data.target_domain.update(kind="tfds", name="mnist")
        c.data.num_train = c.data.num_test = 0  # whole splits
    if "seg" in variants:
        c.task = "segment"
        c.image_size = 32
        c.batch_size = 16
        c.eval_batch_size = 100
        c.data = tasks.data_block("segment", num_train=2000, num_test=200)
        c.model.t_features, c.model.t_hidden = (16, 32, 64), 0
        c.model.d_feat_hidden = (64, 64)
    if "runlocal" in variants:
        c.batch_size = 4
        c.stage_steps = {"pretrain": 2, "pixel": 2, "feature": 2}
        c.stage_batch_size = {"pretrain": 0, "pixel": 0, "feature": 0}
        c.data.num_train, c.data.num_test = 32, 16
        c.model.ngf, c.model.n_blocks, c.model.ndf = 4, 1, 4
        c.model.t_features, c.model.t_hidden = (4, 4, 4), 8
        c.model.d_feat_hidden = (8,)
        c.loss.pool_size = 4
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.eval_batch_size = 8
    # The sum of the stages' steps, following later edits of stage_steps (a reference).
    steps = c.stage_steps
    c.num_train_steps = (
        steps.get_ref("pretrain") + steps.get_ref("pixel") + steps.get_ref("feature")
    )
    c.lock()
    return c
