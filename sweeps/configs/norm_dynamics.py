"""Norm dynamics under the square loss (Xu, Rangamani, Liao, Galanti, Poggio, Research 2023).

Binary classification with one output and +-1 targets, square loss. Three forms of the same
bias-free ReLU network (static axis `norm`):
  "batch":    non-affine batch norm before every hidden ReLU; SGD with heavy-ball momentum
              and L2 weight decay on every weight, as the authors train;
  "lagrange": no batch norm; every layer W_k = rho_k V_k with ||V_k||_F = 1 (Lagrange-multiplier
              normalization), `steps.normalized_gd` on the same minibatches: projected steps
              on the unit spheres, weight decay on the scales rho_k only (momentum unused, so
              its steps are 1/(1 - momentum) = 10x shorter than the others');
  "none":     neither normalization (the homogeneous network) - with weight decay 0 this is the
              "neither" case, where a small initialization should give larger normalized margins.
Every layer starts at Frobenius norm `init_scale` (init="frobenius", scale 1, times the traced
init_scale). Records rho = prod_k ||W_k||_F, the layer norms, the normalized margins
y f(x) / rho (mean, std, min over the training set), loss and accuracy.

CPU scale: two digits classes (3 vs 5, 292 training images), inputs at unit norm,
64 -> 64 -> 64 -> 1, batch 32, lr 0.01, momentum 0.9, wd {0, 0.01}, init scales
{0.01, 0.1, 1, 3} (3 added: below 1 the normalized margin no longer depends on the scale
here), 20000 steps, 3 seeds: 72 runs, about 4 minutes on 2 CPU cores.
`--set scale=paper`: the authors' setup, binary CIFAR-10 (two classes, `data_root` must hold
the CIFAR-10 python batches), a 4-layer conv net (three 3x3 conv layers of stride 2 with
non-affine BN before the ReLUs, global average pooling, then a dense output; the authors'
exact layer sizes are not reproduced), SGD lr 0.01, momentum 0.9, batch 128, wd 0.01 or 0,
init scales 0.01..10.
"""

import functools

import numpy as np

import dynamics as dyn
from sweeps import Sweep

NORMS = ("batch", "lagrange", "none")
OBSERVABLES = ("loss", "accuracy", "rho", "layer_norm", "margins")


def binary_task(dataset, classes, data_root, n_train):
    """Two classes of a data set as a +-1 task (classes[0] -> -1), inputs at unit L2 norm;
    n_train > 0 keeps that many training examples."""
    if dataset == "digits":
        return dyn.data.digits(
            seed=0, classes=classes, binary=True, normalize="unit", n_train=n_train or None
        )
    if dataset != "cifar10":
        raise ValueError(f"dataset: must be 'digits' or 'cifar10', got {dataset!r}")
    full = dyn.data.cifar10(data_root, seed=0, normalize="standard")

    def pick(x, y, n=None):
        keep = np.flatnonzero(np.isin(y, classes))[:n]
        x = x[keep] / np.linalg.norm(x[keep].reshape(len(keep), -1), axis=1)[:, None, None, None]
        return x.astype(np.float32), np.where(y[keep] == classes[0], -1.0, 1.0).astype(np.float32)

    x_tr, y_tr = pick(full.x_train, full.y_train, n_train or None)
    x_te, y_te = pick(full.x_test, full.y_test)
    name = "cifar10" + "".join(map(str, classes))
    return dyn.data.Dataset(x_tr, y_tr, x_te, y_te, 2, name)


def build(steps, record_every, norm, dataset, classes, data_root, n_train, width, depth, batch):
    if norm not in NORMS:
        raise ValueError(f"norm: must be one of {NORMS}, got {norm!r}")
    data = binary_task(dataset, tuple(classes), data_root, n_train)
    kw = dict(init="frobenius", scale=1.0)
    if norm == "batch":
        kw.update(norm="batch", affine=False)
    elif norm == "lagrange":
        kw.update(weight_param="lagrange")
    if dataset == "digits":
        model = dyn.mlp((data.x_train.shape[1],) + (width,) * depth + (1,), **kw)
    else:
        channels = tuple(width * 2**i for i in range(depth))
        # global average pooling keeps the last layer's curvature (|mean feature|^2) small
        model = dyn.cnn(data.x_train.shape[1:], channels, 1, stride=2, pool="avg", **kw)
    stepper = (
        dyn.normalized_gd
        if norm == "lagrange"
        else functools.partial(dyn.sgd, momentum="heavy_ball")
    )
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=stepper,
        steps=steps,
        record_every=record_every,
        observables=OBSERVABLES,
        batch=batch,
        eval_size=None if dataset == "digits" else 2048,
    )


SWEEP = Sweep(
    name="norm_dynamics",
    description="rho, layer norms, margins under the square loss: BN / Lagrange / no norm, wd 0 or 0.01, init scales",
    build=build,
    settings=dict(
        steps=20000,
        record_every=500,
        norm="batch",
        dataset="digits",
        classes=(3, 5),
        data_root="",
        n_train=0,
        width=64,
        depth=2,
        batch=32,
    ),
    grid=dict(
        seed=[0, 1, 2],
        lr=[0.01],
        momentum=[0.9],
        weight_decay=[0.0, 0.01],
        init_scale=[0.01, 0.1, 1.0, 3.0],
    ),
    static=dict(norm=["batch", "lagrange", "none"]),
    scales=dict(
        paper=dict(
            dataset="cifar10",
            data_root="data/cifar-10-batches-py",
            classes=(3, 5),
            width=32,
            depth=3,
            batch=128,
            steps=16000,
            record_every=400,
            init_scale=[0.01, 0.1, 1.0, 10.0],
            seed=[0, 1, 2],
        )
    ),
)
