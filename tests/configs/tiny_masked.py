"""A sweep over static depths of a uniform stack (a linear 1-D conv net's blocks, or an MLP's
hidden layers) x a normalization, for depth masking: one program per norm at the deepest
depth against one program per depth."""

import dynamics as dyn
from sweeps import Sweep


def build(steps, record_every, family, depth, norm, observables):
    if family == "conv":
        model = dyn.linear_conv1d(
            depth,
            kernel=5,
            channels=2,
            norm=norm,
            channel_form="var_unbiased",
            norm_bias=True,
            head="sigmoid",
            out_channels=1,
            init="pytorch",
        )
        data = dyn.data.signal_fitting(dyn.data.step_signal(16), in_channels=2)
        batch, sampling = None, "full"
    else:
        model = dyn.mlp((6,) + (8,) * (depth + 1) + (3,), bias=norm == "bias")
        data = dyn.data.gaussian_mixture(seed=0, n_train=32, n_test=16, d=6, num_classes=3)
        batch, sampling = 8, "replacement"
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=tuple(observables.split("+")),
        batch=batch,
        sampling=sampling,
        gradient="autodiff",
    )


SWEEP = Sweep(
    name="tiny_masked",
    description="runner test sweep over stack depths",
    build=build,
    settings=dict(
        steps=20,
        record_every=5,
        family="conv",
        depth=2,
        norm="bias",
        observables="loss+grad_norm+layer_norm+sv",
    ),
    grid=dict(seed=[0, 1], lr=[0.05]),
    static=dict(depth=[2, 3, 4], norm=["bias", "channel"]),
    keep_params=False,
)
