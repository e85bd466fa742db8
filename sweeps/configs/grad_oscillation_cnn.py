"""P3 of REPRODUCTIONS.md: gradient oscillation (Morchdi et al., Allerton 2023), small CNN.

The companion of `grad_oscillation` (the MLP; same data, loss, observables and schedule):
full-batch GD on the same 512 unit-normalized digits as 1 x 8 x 8 images, square loss, a
4-layer tanh CNN: three 3 x 3 convolutions of stride 2 with 8, 16, 32 channels (zero
padding, no bias; 8x8 -> 4x4 -> 2x2 -> 1x1), then a dense 32 -> 10 layer.

Learning rates (absolute; lr is traced): lambda_max at initialization (store's `sharpness` at
step 0, by Lanczos) is 0.195, 0.266, 0.340 for seeds 0, 1, 2, so 2/lambda_max is 10.3, 7.5,
5.9. Progressive sharpening brings lambda_max to 2/lr within a few hundred steps for
lr >~ 1.5; the grid spans 1/24 to 1 of 2/lambda_max of the sharpest seed (5.9), the largest
lr (6) being stable for every seed (lr 15 diverges).
"""

import dynamics as dyn
from sweeps import Sweep
from sweeps.configs.grad_oscillation import digits_unit, oscillation_spec


def build(steps, record_every, slow_every, channels, stride, activation, n_train, sharpness_iters):
    model = dyn.cnn((1, 8, 8), channels, 10, stride=stride, activation=activation)
    return oscillation_spec(
        model, digits_unit(n_train, image=True), steps, record_every, slow_every, sharpness_iters
    )


SWEEP = Sweep(
    name="grad_oscillation_cnn",
    description="Morchdi et al. 2023: full-batch GD on digits images, 4-layer tanh CNN, lr up to 2/lambda_max; adjacent-gradient cosines per layer",
    build=build,
    settings=dict(
        steps=600,
        record_every=10,
        slow_every=10,
        channels=(8, 16, 32),
        stride=2,
        activation="tanh",
        n_train=512,
        sharpness_iters=100,
    ),
    grid=dict(seed=[0, 1, 2], lr=[0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
    # The paper's scale: all 1438 training images (lambda_max at init of seeds 0-4: 0.20, 0.24,
    # 0.34, 0.27, 0.37; lr 6 is 1.1 x 2/lambda_max of the sharpest), 5x the steps, 5 seeds.
    scales=dict(paper=dict(steps=3000, n_train=0, seed=list(range(5)), sharpness_iters=100)),
)
