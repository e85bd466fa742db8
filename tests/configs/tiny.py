"""A sweep small enough for the runner's tests: 16 runs of a tiny MLP on a Gaussian mixture."""

import dynamics as dyn
from sweeps import Sweep


def build(steps, record_every, width, depth, n_train):
    data = dyn.data.gaussian_mixture(seed=0, n_train=n_train, n_test=32, d=8, num_classes=3)
    model = dyn.mlp((8,) + (width,) * depth + (3,))
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="cross_entropy",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=("loss", "test_accuracy", "rho", "spectrum", "grad_corr", "grad_norm"),
        slow_every=2,
    )


SWEEP = Sweep(
    name="tiny",
    description="runner test sweep",
    build=build,
    settings=dict(steps=40, record_every=10, width=8, depth=2, n_train=64),
    grid=dict(seed=[0, 1], lr=[0.05, 0.2], batch_size=[4, 16], weight_decay=[0.0, 1e-3]),
)
