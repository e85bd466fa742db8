"""P1, low-rank bias of SGD with weight decay (Galanti, Siegel, Gupte, Poggio, arXiv 2206.05794).

An MLP with batch norm before every ReLU trained by plain SGD (no momentum, weight decay as L2
in the gradient) on cross-entropy, across batch sizes, learning rates and weight decays;
records the singular values and numerical rank of every weight matrix and "dist", the update
size ||W_{t+1} - W_t||_F / lr.

CPU scale: sklearn's digits, 4 hidden layers of width 64. Paper scale (`--set scale=paper`):
CIFAR-10 from `data_root` (the "python version" batches), 10 layers of width 100, B in
{4..128}, lr 0.1, wd up to 6e-3, 500 epochs worth of steps at the smallest batch.
"""

import dynamics as dyn
from sweeps import Sweep


def build(steps, record_every, slow_every, width, depth, loss, affine, data, data_root, n_train):
    if data == "digits":
        ds = dyn.data.digits(seed=0, normalize="standard", n_train=n_train)
    elif data == "cifar10":
        ds = dyn.data.cifar10(data_root, seed=0, n_train=n_train, normalize="standard")
    else:
        raise ValueError(f"data: must be 'digits' or 'cifar10', got {data!r}")
    d_in = int(ds.x_train[0].size)
    model = dyn.mlp((d_in,) + (width,) * depth + (ds.num_classes,), norm="batch", affine=affine)
    return dyn.RunSpec(
        model=model,
        data=ds,
        loss=loss,
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        slow_every=slow_every,
        observables=("loss", "accuracy", "test_accuracy", "layer_norm", "spectrum", "update_size"),
        eval_size=2048,
    )


SWEEP = Sweep(
    name="low_rank",
    description="P1 low-rank bias of SGD + weight decay: BN-MLP on digits, rank and 'dist' vs B, lr, wd",
    build=build,
    settings=dict(
        steps=3000,
        record_every=100,
        slow_every=1,
        width=64,
        depth=4,
        loss="cross_entropy",
        affine=True,
        data="digits",
        data_root="data/cifar-10-batches-py",
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
            depth=9,  # 9 hidden layers + the classifier: 10 weight layers
            steps=6_250_000,  # 500 epochs of 50000 images at B=4
            record_every=62_500,
            seed=[0, 1, 2],
            lr=[0.1],
            batch_size=[4, 8, 16, 32, 64, 128],
            weight_decay=[0.0, 1e-3, 3e-3, 6e-3],
        )
    ),
)
