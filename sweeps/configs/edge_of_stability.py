"""Beyond the seeds (REPRODUCTIONS.md): the edge of stability (Cohen, Kaur, Li, Kolter,
Talwalkar, ICLR 2021, arXiv 2103.00065).

The claim: under full-batch gradient descent with step size lr the sharpness lambda_max (the
top eigenvalue of the training loss's Hessian) rises during training (progressive sharpening)
until it reaches 2/lr, the stability threshold of GD on a quadratic, and then hovers at or just
above it while the loss keeps falling over long times, non-monotonically. The paper's main
setting: full-batch GD on a 5000-image subset of CIFAR-10 with the square loss, among others
fully connected tanh networks, the sharpness by Lanczos on the full training set, several lr.

Here (CPU scale): full-batch GD (sampling="full") on 512 of sklearn's digits with unit-norm
rows (x / ||x||_2; with these inputs lambda_max at initialization is about 2, below 2/lr, and
sharpens, as the P3 sweep grad_oscillation found), square loss (mean over the 10 outputs of
(f - onehot)^2), a tanh MLP 64 -> 64 x 5 -> 10 without biases, He-Gaussian init (gain 1 for
tanh); lr {0.4, 0.67, 1.0} (2/lr = 5, 3, 2), 2 seeds, 2000 steps. Recorded: the training loss
every 10 steps and the sharpness every 100 (Lanczos on Hessian-vector products of the full
training loss, `observables.sharpness`, at most 60 products, stopped at a Ritz residual of
1e-3 of the value).

6 runs in one program: 40-79 s of wall time (compile 5-7 s, run 40-68 s, by the machine's load
of 4-7 from other jobs on its 2 cores). `--set scale=paper`: CIFAR-10 from `data_root` (the python batches),
5000 training images scaled to [0, 1] and flattened (3072 inputs), a tanh MLP with two hidden
layers of width 200, 20000 steps (a GPU job), lr {0.02, 0.04, 0.067}: a starting grid, not the
paper's values; set it from lambda_max at initialization (`--set scale=paper,steps=10` first:
the sharpness at step 0 does not depend on lr), so that 2/lr lies above it.
"""

import dynamics as dyn
from sweeps import Sweep


def load_data(dataset: str, data_root: str, n_train: int):
    if dataset == "digits":
        return dyn.data.digits(seed=0, normalize="unit", n_train=n_train)
    if dataset == "cifar10":
        d = dyn.data.cifar10(data_root, seed=0, n_train=n_train, n_test=0)
        flat = d.x_train.reshape(d.x_train.shape[0], -1)
        return dyn.Dataset(flat, d.y_train, flat[:0], d.y_train[:0], 10, "cifar10_flat")
    raise ValueError(f"dataset: must be 'digits' or 'cifar10', got {dataset!r}")


def build(dataset, data_root, n_train, depth, width, steps, record_every, slow_every, iters):
    data = load_data(dataset, data_root, n_train)
    d_in = data.x_train.shape[1]
    model = dyn.mlp((d_in,) + (width,) * (depth - 1) + (10,), activation="tanh")
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        slow_every=slow_every,
        observables=("loss", "accuracy", "sharpness"),
        sampling="full",
        eval_size=None,
        sharpness_iters=iters,
        sharpness_tol=1e-3,
    )


SWEEP = Sweep(
    name="edge_of_stability",
    description="Cohen et al. 2021: full-batch GD, tanh MLP on unit-norm digits, square loss; sharpness vs 2/lr over training",
    build=build,
    settings=dict(
        dataset="digits",
        data_root="data/cifar-10-batches-py",
        n_train=512,
        depth=6,
        width=64,
        steps=2000,
        record_every=10,
        slow_every=10,
        iters=60,
    ),
    grid=dict(seed=[0, 1], lr=[0.4, 0.67, 1.0]),
    scales=dict(
        paper=dict(
            dataset="cifar10", n_train=5000, depth=3, width=200, steps=20000, lr=[0.02, 0.04, 0.067]
        )
    ),
)
