"""P3 of REPRODUCTIONS.md: gradient oscillation (Morchdi, Zhou, Ding, Wang, Allerton 2023), MLP.

Full-batch gradient descent (sampling="full") on sklearn's digits, square loss (mean over the
10 outputs of (f - onehot)^2), a 6-layer fully connected net without bias, widths
64 -> 64 x 5 -> 10, Gaussian (He-scaled) init, activation tanh or ReLU (a static axis).
Recorded every 10 steps: the training loss, the adjacent-gradient cosine cos(g_t^l, g_{t+1}^l)
of every layer and of the whole gradient, averaged over the 10 steps of the record interval
(`grad_cos`, `grad_cos_global`), the fraction of those pairs with a negative cosine
(`grad_cos_neg_frac`, `..._global`), and every 100 steps the sharpness lambda_max (top
Hessian eigenvalue of the training loss, by Lanczos on Hessian-vector products to a relative
residual of 1e-4, at most `sharpness_iters` products).

Inputs are unit-normalized images (x / ||x||_2: non-negative, not centred). With that
scaling lambda_max is small at initialization and grows during training (progressive
sharpening) until it reaches 2/lr, where GD oscillates across the sharpest direction ("edge
of stability", Cohen et al. 2021): the adjacent gradients are then negatively correlated.
(With standardized inputs, ||x|| ~ 8, lambda_max starts large and collapses within a few
steps, and GD on this easy task never oscillates below the divergent lr: see the notes.)

The learning-rate grid (absolute values, since lr is traced and shared by all seeds and by
both activations). lambda_max at initialization is the store's `sharpness` at step 0; it was
measured first with `python -m sweeps run grad_oscillation --set steps=10,record_every=10,
lr=1e-4` (seeds 0, 1, 2): tanh 1.88, 1.82, 1.84; ReLU 1.76, 2.84, 1.63, so 2/lambda_max is
about 1.09 (tanh) and 0.70-1.23 (ReLU). The grid spans 1/36 to 1 of 2/1.84 ~= 1.09, dense
around the onset of oscillation (lr ~ 0.5 here), up to 1.0, the largest lr that is stable
for every seed and both activations. The sharpness over time shows which runs sit at the
edge of stability (lambda_max ~ 2/lr).
"""

import dynamics as dyn
from sweeps import Sweep


def digits_unit(n_train, image=False):
    """Digits with unit-norm rows (shared by the CNN sweep); n_train=0 keeps all 1438."""
    return dyn.data.digits(seed=0, normalize="unit", n_train=n_train or None, image=image)


def oscillation_spec(model, data, steps, record_every, slow_every, sharpness_iters):
    """Full-batch GD, square loss, adjacent-gradient cosines and sharpness (shared by the CNN
    sweep)."""
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=("loss", "grad_corr", "sharpness"),
        slow_every=slow_every,
        sampling="full",
        sharpness_iters=sharpness_iters,
    )


def build(steps, record_every, slow_every, depth, width, activation, n_train, sharpness_iters):
    model = dyn.mlp((64,) + (width,) * (depth - 1) + (10,), activation=activation)
    return oscillation_spec(
        model, digits_unit(n_train), steps, record_every, slow_every, sharpness_iters
    )


SWEEP = Sweep(
    name="grad_oscillation",
    description="Morchdi et al. 2023: full-batch GD on digits, 6-layer MLP (tanh/ReLU), lr up to 2/lambda_max; adjacent-gradient cosines per layer",
    build=build,
    settings=dict(
        steps=600,
        record_every=10,
        slow_every=10,
        depth=6,
        width=64,
        activation="tanh",
        n_train=512,
        sharpness_iters=100,
    ),
    grid=dict(seed=[0, 1, 2], lr=[0.03, 0.06, 0.12, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0]),
    static=dict(activation=["tanh", "relu"]),
    # The paper's scale: all 1438 training images, 5x the steps, 5 seeds (lambda_max at init
    # of seeds 0-4 on all images: tanh 1.89, 1.82, 1.85, 1.19, 1.84; the same lr grid).
    scales=dict(paper=dict(steps=3000, n_train=0, seed=list(range(5)), sharpness_iters=100)),
)
