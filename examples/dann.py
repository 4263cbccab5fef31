"""An eighth method in one file: DANN (Ganin & Lempitsky 2015), domain-adversarial training.

A discriminator D tells source features from target ones; the feature net F and the classifier
C learn the source labels while F makes target features pass as source. Train it with

  PYTHONPATH=examples python train.py --config=examples/dann_config.py --workdir=/tmp/dann

(``config.method = "dann:DANN"`` names this file's class; a method inside the package is listed
in ``ganda_jax.methods.METHODS`` instead). ``tests/test_add_a_method.py`` trains it.
"""

import flax.linen as nn
import jax

from ganda_jax import engine, losses
from ganda_jax.metrics import classify_eval


class DANN(classify_eval.TaskClassifier, engine.Method):
    name, data_task = "dann", "classify"  # labelled source digits, unlabelled target digits
    players = {"F": "F", "C": "F", "D": "D"}  # player -> its block in config.optimizer
    baselines = (engine.source_only("F", "C"),)  # copies F_src, C_src trained on source only
    prepare = staticmethod(engine.adaptation_batch)  # source, label, target; images in [-1, 1]

    def __init__(self, config):
        super().__init__(config)
        conv = lambda f: nn.Conv(f, (5, 5), strides=2)  # noqa: E731
        flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
        self.F = nn.Sequential([conv(16), nn.relu, conv(32), nn.relu, flat])
        self.C = nn.Dense(config.data.num_classes)
        self.D = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(1)])

    def init(self, rng, batch):
        """-> (params, model state such as BatchNorm statistics, extra buffers)."""
        k_f, k_c, k_d = jax.random.split(rng, 3)
        x = batch["source"][:1]
        f = self.F.init(k_f, x)["params"]
        h = self.F.apply({"params": f}, x)
        params = {"F": f, "C": self.C.init(k_c, h)["params"], "D": self.D.init(k_d, h)["params"]}
        return params, {}, {}

    def features(self, params, x):
        return self.F.apply({"params": params["F"]}, x)

    def task_logits(self, params, x):
        """C(F(x)): what TaskClassifier trains the baselines on and scores on the test splits."""
        return self.C.apply({"params": params["C"]}, self.features(params, x))

    def domain_logits(self, params, h):
        return self.D.apply({"params": params["D"]}, h)[:, 0]

    def phases(self):
        """The algorithm's updates, in order; each moves only its own players."""
        return (
            engine.Phase("D", ("D",), self.domain_loss),
            engine.Phase("FC", ("F", "C"), self.task_loss),
        )

    def domain_loss(self, params, inp):
        """L_D = BCE(D(F(x_s)), 1) + BCE(D(F(x_t)), 0)."""
        h_s, h_t = (
            jax.lax.stop_gradient(self.features(params, inp.batch[k])) for k in ("source", "target")
        )
        loss = losses.gan_discriminator_loss(
            real_logits=self.domain_logits(params, h_s),
            fake_logits=self.domain_logits(params, h_t),
            loss_type="nsgan",
        )
        return loss, engine.Out(metrics={"D/domain": loss})

    def task_loss(self, params, inp):
        """L_FC = CE(C(F(x_s)), y_s) + w BCE(D(F(x_t)), 1), w = loss.adv_weight."""
        ce, _ = self.supervised_loss(params, inp, inp.batch["source"], inp.batch["label"])
        h_t = self.features(params, inp.batch["target"])
        fool = losses.gan_generator_loss(
            fake_logits=self.domain_logits(params, h_t), loss_type="nsgan"
        )
        loss = ce + self.config.loss.adv_weight * fool
        return loss, engine.Out(metrics={"C/ce": ce, "F/fool": fool})
