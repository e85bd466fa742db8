"""P4 (b) of REPRODUCTIONS.md: a 12-layer, 4-channel 1-D deep decoder fitting a step function of
length 1024 from a noise input, with and without channel normalization (Dai & Heckel, arXiv
1907.09539, the ReLU experiment of their one_dim_net_convergence notebook).

Blocks x_k = N(relu(w_k * x_{k-1})) with 3-tap circular convolutions, 4 channels, no bias,
then a 1x1 convolution to one channel and a sigmoid. Weights use PyTorch's default conv init
(init="uniform", gain=1/sqrt 3). Target: 0 on the first half, 1 on the second; input: fixed
N(0, 1) noise of 4 channels. Square loss (mean over outputs), SGD with heavy-ball momentum 0.9
(PyTorch's SGD), lr 0.1, 2000 iterations. Without normalization the output sits at
sigmoid(~0) = 1/2 and the loss at 1/4.

Differences from the authors' notebook: their normalization adds a learned bias per channel,
their last 1x1 convolution has a bias, and their input is uniform in [0, 1); here no layer has
a bias (REPRODUCTIONS.md's setup) and the input is Gaussian.
"""

import functools
import math

import dynamics as dyn
from sweeps import Sweep

PYTORCH_GAIN = 1.0 / math.sqrt(3.0)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Conv1d default


def build(steps, record_every, norm, channels, depth, kernel, n):
    data = dyn.data.signal_fitting(dyn.data.step_signal(n), in_channels=channels, seed=0)
    model = dyn.deep_decoder(
        channels,
        depth,
        in_channels=channels,
        out_channels=1,
        kernel=kernel,
        dim=1,
        norm=norm,
        padding="circular",
        output="sigmoid",
        init="uniform",
        gain=PYTORCH_GAIN,
    )
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        steps=steps,
        record_every=record_every,
        observables=("loss", "grad_norm"),
        sampling="full",
    )


SWEEP = Sweep(
    name="channel_norm_decoder",
    description="Dai & Heckel 2019: 12-layer 4-channel 1-D decoder fitting a step, with/without channel norm",
    build=build,
    settings=dict(steps=2000, record_every=1, norm=None, channels=4, depth=12, kernel=3, n=1024),
    grid=dict(seed=[0, 1, 2, 3], lr=[0.1], momentum=[0.9]),
    static=dict(norm=[None, "channel"]),
    scales=dict(paper=dict(seed=list(range(10)))),
)
