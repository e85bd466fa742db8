"""P4 (a) of REPRODUCTIONS.md: deep single-channel linear 1-D convolutional networks fitting one
example, with and without channel normalization (Dai & Heckel, arXiv 1907.09539, section 4).

x_k = N(w_k * x_{k-1}), y_hat = w_L * x_{L-1}: L circular convolutions of `kernel` taps on a
signal of length n = 128, one channel, no bias; N is channel normalization (centre, divide by
the standard deviation over space) or the identity. Weights use PyTorch's default conv init,
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (init="uniform", gain=1/sqrt 3), under which each
convolution shrinks the signal by about 1/sqrt 3, so without normalization the gradient at
initialization vanishes exponentially in the depth. Target: a fixed random signal, uniform
in [0, 1) and centred (a normalized net without bias has zero-mean outputs, so only a
zero-mean target can be fitted by both), from a fixed N(0, 1) noise input; square loss (the
mean over the n outputs, PyTorch's MSELoss), gradient descent with lr 0.1, every step recorded
(record 1 holds the gradient at initialization).
"""

import math

import numpy as np

import dynamics as dyn
from sweeps import Sweep

PYTORCH_GAIN = 1.0 / math.sqrt(3.0)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Conv1d default


def target_signal(n, target):
    """The fitted signal: "uniform" (random, centred) or "step" (-1/2 then +1/2); float32 (n,)."""
    if target == "uniform":
        y = np.random.default_rng(0).uniform(size=n)
        return (y - y.mean()).astype(np.float32)
    if target == "step":
        return dyn.data.step_signal(n, low=-0.5, high=0.5)
    raise ValueError(f"target: must be 'uniform' or 'step', got {target!r}")


def build(steps, record_every, depth, norm, n, kernel, target):
    data = dyn.data.signal_fitting(target_signal(n, target), in_channels=1, seed=1)
    model = dyn.linear_conv1d(
        depth,
        kernel=kernel,
        channels=1,
        padding="circular",
        norm=norm,
        init="uniform",
        gain=PYTORCH_GAIN,
    )
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=("loss", "grad_norm"),
        sampling="full",
    )


SWEEP = Sweep(
    name="channel_norm_depth",
    description="Dai & Heckel 2019: deep linear 1-D conv nets, depth x channel norm; gradients at init, loss",
    build=build,
    settings=dict(
        steps=2000, record_every=1, depth=5, norm=None, n=128, kernel=15, target="uniform"
    ),
    grid=dict(seed=list(range(8)), lr=[0.1]),
    static=dict(depth=[5, 10, 30], norm=[None, "channel"]),
    scales=dict(paper=dict(depth=[2, 5, 10, 15, 20, 30], seed=list(range(20)))),
)
