"""The benchmark's reference grid (fixed, so throughput compares across versions).

A deep homogeneous ReLU MLP (32 -> 64 -> 64 -> 64 -> 10, no bias, He-normal) on a teacher
task (1024 Gaussian inputs of dimension 32, labels of a fixed random teacher of the same
shape, one-hot targets), square loss, SGD with L2 weight decay, 500 steps, observables every
50 steps. 4 seeds x 4 lr x 4 weight decays x 4 batch sizes = 256 runs.
"""

import dynamics as dyn
from sweeps import Sweep

OBSERVABLES = ("loss", "rho", "layer_norm", "spectrum", "grad_corr", "grad_norm")


def build(steps, record_every, observables):
    data = dyn.data.teacher_classification(seed=0, n_train=1024, n_test=0, d_in=32, num_classes=10)
    model = dyn.mlp((32, 64, 64, 64, 10), init="gaussian")
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=OBSERVABLES if observables == "all" else tuple(observables.split("+")),
        eval_size=1024,
    )


SWEEP = Sweep(
    name="reference",
    description="benchmark grid: 256 runs of a 4-layer ReLU MLP on a teacher task, 500 SGD steps",
    build=build,
    settings=dict(steps=500, record_every=50, observables="all"),
    grid=dict(
        seed=[0, 1, 2, 3],
        lr=[0.01, 0.02, 0.03, 0.04],
        batch_size=[8, 16, 32, 128],
        weight_decay=[0.0, 1e-4, 1e-3, 1e-2],
    ),
)
