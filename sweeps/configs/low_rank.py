"""P1, low-rank bias of SGD with weight decay (Galanti, Siegel, Gupte, Poggio, arXiv 2206.05794).

An MLP with batch norm before every ReLU, trained by plain SGD (no momentum, weight decay as L2
in the gradient) on cross-entropy, across batch sizes, learning rates and weight decays. Records
the singular values of every weight matrix (so the numerical rank at any tolerance can be
recomputed), the rank at 1e-3, and "dist" = ||W_{t+1} - W_t||_F / lr.

Every run takes the same number of steps. The authors instead train every batch size for the
same number of epochs (500), so a batch of 4 takes 32 times the steps of a batch of 128; since a
run here does not depend on its length (constant lr), the run of batch size B stopped at step
T * min(B) / B is exactly that run, and figures/low_rank.py reads both comparisons off one store.

CPU scale: sklearn's digits (1437 training images), 4 hidden layers of width 64, 3200 steps
(8.9 epochs at B=4). Paper scale (`--set scale=paper`): CIFAR-10 read from `data_root` (the
"python version" batches), the authors' 10 hidden layers of width 100, lr 0.1, 500 epochs at
B=4 (6.25M steps; every larger batch reaches 500 epochs earlier in the same runs).
"""

import dynamics as dyn
from sweeps import Sweep

OBSERVABLES = ("loss", "accuracy", "test_accuracy", "layer_norm", "spectrum", "update_size")


def dataset(data, data_root, n_train):
    if data == "digits":
        return dyn.data.digits(seed=0, normalize="standard", n_train=n_train)
    if data == "cifar10":
        return dyn.data.cifar10(data_root, seed=0, n_train=n_train, normalize="standard")
    raise ValueError(f"data: must be 'digits' or 'cifar10', got {data!r}")


def build(steps, record_every, width, depth, loss, affine, data, data_root, n_train):
    ds = dataset(data, data_root, n_train)
    d_in = int(ds.x_train[0].size)
    # Linear -> BN -> ReLU blocks and a linear classifier, as the authors' MLP. Their BN is
    # PyTorch's affine BatchNorm1d (affine=True); BN's centring cancels their hidden layers'
    # biases. Not kept: their classifier's bias and their code's default leaky ReLU.
    model = dyn.mlp((d_in,) + (width,) * depth + (ds.num_classes,), norm="batch", affine=affine)
    return dyn.RunSpec(
        model=model,
        data=ds,
        loss=loss,
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        observables=OBSERVABLES,
        eval_size=2048,
    )


def train_size(data, n_train=None, **_) -> int:
    """Training examples of a setting (what one epoch means), without loading CIFAR-10."""
    if data == "cifar10":
        return int(min(n_train or 50_000, 50_000))
    return int(dataset(data, None, n_train).x_train.shape[0])


SWEEP = Sweep(
    name="low_rank",
    description="P1 low-rank bias of SGD + weight decay: BN-MLP on digits; rank and 'dist' vs B, lr, wd",
    build=build,
    settings=dict(
        steps=3200,
        record_every=100,
        width=64,
        depth=4,
        loss="cross_entropy",
        affine=True,
        data="digits",
        data_root="data",
        n_train=None,
    ),
    grid=dict(
        seed=[0, 1, 2],
        lr=[0.05, 0.1, 0.5],
        batch_size=[4, 8, 16, 32, 128],
        weight_decay=[0.0, 1e-4, 1e-3, 5e-3],
    ),
    scales=dict(
        paper=dict(
            data="cifar10",
            width=100,
            depth=10,
            steps=6_250_000,  # 500 epochs of the 50000 training images at B=4
            record_every=12_500,  # one record per epoch at B=4
            seed=[0, 1, 2],
            lr=[0.1],
            batch_size=[4, 8, 16, 32, 64, 128],
            weight_decay=[0.0, 1e-3, 3e-3, 6e-3],
        )
    ),
)
