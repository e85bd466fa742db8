"""The benchmark's convolutional reference grid (fixed, so throughput compares across versions).

The P2 authors' 4-layer conv net shape (GraceXu182/binaryclassifiers_squareloss,
extarget.py:668-748, `NetSimpleConv4`: three 3x3 convolutions of stride 2 doubling the channels,
then one layer to the classes; notes in docs/protocols/P2.md) on 16x16 single-channel
images, kept simple and fixed: `dyn.cnn((1, 16, 16), (16, 32, 64), 10, stride=2)`, i.e.

    conv 1 -> 16, 3x3, stride 2, zero ("SAME") padding, ReLU   16x16 -> 8x8
    conv 16 -> 32, 3x3, stride 2, ReLU                         8x8 -> 4x4
    conv 32 -> 64, 3x3, stride 2, ReLU                         4x4 -> 2x2
    dense 256 -> 10

no bias, no batch norm, He-normal init ("gaussian"). The channels are the authors' at
`--widen-factor 2` (hidden size 8 x widen, their README runs widen 4, i.e. 32, 64, 128) so that
the whole bench stays within about ten minutes on a 2-core machine; the last layer is a dense
layer on the flattened 2x2 map (the authors' is a 4x4 conv on a 4x4 map: the same map to the
classes at their input size). 0.32 MFLOP per example forward (conv and dense FLOPs).

Data: scikit-learn's 8x8 digits (bundled, loads in well under a second), per-pixel
standardized on the train split (`digits(normalize="standard")`), each pixel repeated 2x2 into
a 16x16 single-channel image, the first 1024 training images; ten classes, one-hot targets.

Square loss (the P2 authors' MSE), SGD with L2 weight decay, 100 steps, observables every 10
steps (the dense grid's: loss, rho, layer norms, spectra of the conv kernels in their
(out, in*k*k) reshape, gradient correlations and norms), evaluated on 256 training images.
4 seeds x 4 lr x 4 weight decays x 4 batch sizes (8, 16, 32, 64) = 256 runs.
"""

import numpy as np

import dynamics as dyn
from sweeps import Sweep

OBSERVABLES = ("loss", "rho", "layer_norm", "spectrum", "grad_corr", "grad_norm")


def digits16(n_train: int) -> dyn.data.Dataset:
    """The digits as 1 x 16 x 16 images: per-pixel standardized, each pixel repeated 2 x 2."""
    d = dyn.data.digits(seed=0, normalize="standard", image=True)

    def up(x):
        return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)

    return dyn.data.Dataset(
        up(d.x_train)[:n_train], d.y_train[:n_train], up(d.x_test), d.y_test, 10, "digits16"
    )


def build(steps, record_every, observables, channels, n_train, eval_size):
    model = dyn.cnn((1, 16, 16), channels, 10, kernel=3, stride=2, padding="zero")
    return dyn.RunSpec(
        model=model,
        data=digits16(n_train),
        loss="square",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=OBSERVABLES if observables == "all" else tuple(observables.split("+")),
        eval_size=eval_size,
    )


SWEEP = Sweep(
    name="reference_conv",
    description="benchmark grid: 256 runs of a 4-layer stride-2 CNN on 16x16 digits, 100 SGD steps",
    build=build,
    settings=dict(
        steps=100,
        record_every=10,
        observables="all",
        channels=(16, 32, 64),
        n_train=1024,
        eval_size=256,
    ),
    grid=dict(
        seed=[0, 1, 2, 3],
        lr=[0.01, 0.02, 0.03, 0.04],
        batch_size=[8, 16, 32, 64],
        weight_decay=[0.0, 1e-4, 1e-3, 1e-2],
    ),
)
