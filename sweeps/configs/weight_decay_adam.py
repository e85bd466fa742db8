"""P7 (d): under Adam, weight decay as L2 regularization (in the gradient, before the moments)
and decoupled weight decay (AdamW: w <- w - lr (adam step + wd w)) differ, and decoupled decay
is the better regularizer (Zhang, Wang, Xu, Grosse, arXiv 1810.12281, "Three mechanisms of
weight decay regularization"), under the authors' protocol (gd-zhang/Weight-Decay at f927935;
citations in docs/protocols/P7.md section C):

- Optimizer (libs/adam/optimizer.py): Adam lr 1e-3, betas (0.9, 0.999), eps 1e-8 outside the
  root, bias-corrected; "l2" adds wd w to the gradient before the moments, "wd" adds wd w to
  the Adam step, which the gradient-descent apply multiplies by lr (shrink lr wd per step).
  `dyn.adam(weight_decay="l2" | "decoupled")`, the same rules. Decay on every trainable
  variable (`weight_list = "all"`: kernels and biases; the BN has none).
- Schedule (core/model.py): lr x 0.1 every 60 epochs of 200 (exponential_decay, staircase).
- Network (network/vgg.py, misc/utils.py): layers with a bias, then batch norm without scale
  or shift (tf.layers.batch_normalization(center=False, scale=False): momentum 0.99, i.e.
  0.01 on the new batch, eps 1e-3), then ReLU; a single dense classifier; Glorot-uniform
  kernels (variance_scaling(1.0, "fan_avg", "uniform")) and zero biases.
- Values: the released Adam config on CIFAR-10 VGG16 with BN is lr 1e-3 with decoupled wd 0.3;
  the repository has no Adam + L2 config with wd > 0, so both conventions sweep the same grid
  of wd here (0, and 1e-4 ... 1), as the paper's comparison does in spirit.

CPU scale (what moved): VGG16 on CIFAR-10 becomes an MLP on sklearn's digits (per-pixel
standardized, no augmentation), 3 hidden layers of 64 (Linear + bias -> non-affine BN ->
ReLU), 60 epochs with the lr drops at the same fractions (18, 36, 54), batch 128, 3 seeds.
The decoupled decay shrinks the weights by lr wd per step, so what it does depends on the
number of steps: the authors' first lr phase (60 epochs of 391 steps, 23460 steps at lr 1e-3)
shrinks by exp(-23460 x 1e-3 x 0.3) = exp(-7) at wd 0.3; ours has 216 steps, where wd 0.3
shrinks by exp(-0.065) and the same total shrink needs wd ~ 30: the grid runs up to 30.
"""

import functools
import math

import jax

import dynamics as dyn
from sweeps import Sweep
from sweeps.configs.norm_matters import digits_or_mnist

DECAYS = ("l2", "decoupled")
OBSERVABLES = ("loss", "accuracy", "test_loss", "test_accuracy", "layer_norm", "effective_lr")


def glorot_uniform(model: dyn.Model) -> dyn.Model:
    """`model` with every layer's weight drawn U(+-sqrt(6 / (fan_in + fan_out))) (TensorFlow's
    variance_scaling(1.0, "fan_avg", "uniform")) and every bias zero; the rest unchanged."""

    def init(key):
        out = []
        for i, p in enumerate(model.init(key)):
            p = dict(p)
            w = p["w"]
            fan_in, fan_out = math.prod(w.shape[1:]), w.shape[0] * math.prod(w.shape[2:])
            a = math.sqrt(6.0 / (fan_in + fan_out))
            p["w"] = jax.random.uniform(jax.random.fold_in(key, i), w.shape, minval=-a, maxval=a)
            if "b" in p:
                p["b"] = p["b"] * 0
            out.append(p)
        return out

    return model._replace(init=init)


def build(epochs, record_every, decay, dataset, data_root, width, depth, batch, milestones):
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    data = digits_or_mnist(dataset, data_root)
    model = dyn.mlp(
        (data.x_train.shape[1],) + (width,) * depth + (data.num_classes,),
        bias=True,
        norm="batch",
        affine=False,
        eps=1e-3,
        bn_momentum=0.01,
    )
    return dyn.RunSpec(
        model=glorot_uniform(model),
        data=data,
        loss="cross_entropy",
        stepper=functools.partial(dyn.adam, weight_decay=decay),
        epochs=epochs,
        record_every=record_every,
        batch=batch,
        lr_schedule=dyn.step_decay(tuple(milestones), 0.1),
        observables=OBSERVABLES,
        eval_size=None,
    )


SWEEP = Sweep(
    name="weight_decay_adam",
    description="P7 Zhang et al.: Adam with L2 vs decoupled weight decay (AdamW) on a digits "
    "MLP with non-affine BN, over a grid of weight decays",
    build=build,
    settings=dict(
        epochs=60,
        record_every=5,
        decay="decoupled",
        dataset="digits",
        data_root="",
        width=64,
        depth=3,
        batch=128,
        milestones=(18, 36, 54),
    ),
    grid=dict(
        seed=[0, 1, 2],
        lr=[1e-3],
        weight_decay=[0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
    ),
    static=dict(decay=list(DECAYS)),
    scales=dict(
        paper=dict(
            dataset="mnist",
            data_root="data/mnist",
            width=256,
            epochs=200,
            milestones=(60, 120, 180),
            record_every=10,
        )
    ),
)
