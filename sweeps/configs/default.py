"""The default sweep: a deep ReLU network on sklearn's digits, across seeds, learning rates,
batch sizes and weight decays, recording norms, spectra, ranks, gradient correlations and
per-layer gradient norms. Minutes on a laptop CPU."""

import dynamics as dyn
from sweeps import Sweep


def build(steps, record_every, width, depth, loss):
    data = dyn.data.digits(seed=0, normalize="standard")
    model = dyn.mlp((64,) + (width,) * depth + (10,))
    return dyn.RunSpec(
        model=model,
        data=data,
        loss=loss,
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=(
            "loss",
            "accuracy",
            "test_loss",
            "test_accuracy",
            "rho",
            "layer_norm",
            "spectrum",
            "grad_corr",
            "grad_norm",
            "update_size",
        ),
    )


SWEEP = Sweep(
    name="default",
    description="ReLU MLP on digits: seeds x lr x batch size x weight decay; norms, ranks, gradient correlations",
    build=build,
    settings=dict(steps=2000, record_every=100, width=64, depth=4, loss="cross_entropy"),
    grid=dict(
        seed=[0, 1, 2],
        lr=[0.02, 0.05, 0.1],
        batch_size=[8, 32, 128],
        weight_decay=[0.0, 1e-4, 1e-3, 5e-3],
    ),
)
