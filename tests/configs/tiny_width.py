"""A sweep over static hidden widths of an MLP (and of Hu et al.'s deep linear net) x an
activation, for width masking: one program per activation at the widest width against one
program per width."""

import dynamics as dyn
from dynamics import orthogonal as orth
from sweeps import Sweep


def build(steps, record_every, family, width, activation, observables):
    if family == "hu":
        data = orth.hu_data(8, 6, 2, seed=0)
        return dyn.RunSpec(
            model=orth.hu_linear(8, width, 5, 2, init=activation),
            data=data,
            loss=orth.hu_loss,
            stepper=dyn.sgd,
            steps=steps,
            record_every=record_every,
            sampling="full",
            lr_schedule=orth.LrFactor(orth.hu_lr(data.x_train, 5, 2)),
            observables=tuple(observables.split("+")),
            eval_size=None,
        )
    return dyn.RunSpec(
        model=dyn.mlp((6, width, width, width, 3), activation=activation, bias=True),
        data=dyn.data.gaussian_mixture(seed=0, n_train=32, n_test=16, d=6, num_classes=3),
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=tuple(observables.split("+")),
        batch=8,
        gradient="autodiff",
    )


SWEEP = Sweep(
    name="tiny_width",
    description="runner test sweep over hidden widths",
    build=build,
    settings=dict(
        steps=20,
        record_every=5,
        family="mlp",
        width=8,
        activation="relu",
        observables="loss+grad_norm+layer_norm+sv+rho",
    ),
    grid=dict(seed=[0, 1], lr=[0.05]),
    static=dict(width=[8, 9, 10], activation=["relu", "tanh"]),
    keep_params=False,
)
