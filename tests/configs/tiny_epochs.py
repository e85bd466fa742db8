"""A sweep trained for epochs: batch sizes 8 and 16 on 40 examples, whose epochs take 5 and 3
steps (the last batch of 8 partial), recording the loss, rho and Galanti et al.'s dist."""

import dynamics as dyn
from sweeps import Sweep


def build(epochs, record_every, width, n_train, precision):
    data = dyn.data.gaussian_mixture(seed=0, n_train=n_train, n_test=16, d=8, num_classes=3)
    return dyn.RunSpec(
        model=dyn.mlp((8, width, width, 3)),
        data=data,
        loss="cross_entropy",
        stepper=dyn.sgd,
        epochs=epochs,
        record_every=record_every,
        observables=("loss", "rho", "dist"),
        precision=precision,
    )


SWEEP = Sweep(
    name="tiny_epochs",
    description="runner test sweep in epochs",
    build=build,
    settings=dict(epochs=4, record_every=2, width=8, n_train=40, precision="float32"),
    grid=dict(seed=[0], lr=[0.1], batch_size=[8, 16]),
)
