"""A sweep over a static depth (one and two hidden layers: 2 and 3 weight layers), for the
store's layer names and slots."""

import dynamics as dyn
from sweeps import Sweep


def build(steps, record_every, width, depth):
    data = dyn.data.gaussian_mixture(seed=0, n_train=32, n_test=16, d=8, num_classes=3)
    return dyn.RunSpec(
        model=dyn.mlp((8,) + (width,) * depth + (3,)),
        data=data,
        loss="cross_entropy",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=("loss", "layer_norm", "grad_norm"),
    )


SWEEP = Sweep(
    name="tiny_depth",
    description="runner test sweep over depth",
    build=build,
    settings=dict(steps=10, record_every=5, width=8, depth=2),
    grid=dict(seed=[0, 1], lr=[0.1], batch_size=[8]),
    static=dict(depth=[1, 2]),
)
