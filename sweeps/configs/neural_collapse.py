"""Neural collapse under the square loss (Papyan, Han, Donoho, PNAS 2020; under MSE: Han,
Papyan, Donoho, ICLR 2022), the multi-class face of Xu et al. (2023).

All ten digits classes, a ReLU MLP with batch norm (affine, before the ReLUs, as in the
convolutional nets of Papyan et al.) and biases, the square loss on one-hot labels, SGD with heavy-ball
momentum and L2 weight decay 5e-4, trained far into the terminal phase (100% training accuracy
after a few hundred steps, then thousands more). The neural-collapse statistics of the
penultimate features (nc1: trace(S_W S_B^+)/C; nc2: equiangularity, nc2_cos -> -1/(C-1),
nc2_equinorm; nc3: classifier vs centred class means; nc4: classifier vs nearest class mean;
cdnv) are costly and recorded every `slow_every` records.

`--set scale=paper`: Han et al.'s setup on CIFAR-10 (`data_root` must hold the CIFAR-10 python
batches) with a small conv net in place of their ResNets, batch 128, 350 epochs.
"""

import functools

import dynamics as dyn
from sweeps import Sweep

OBSERVABLES = ("loss", "accuracy", "test_accuracy", "nc")


def build(steps, record_every, slow_every, dataset, data_root, width, depth, norm, batch):
    if dataset == "digits":
        data = dyn.data.digits(seed=0, normalize="standard")
        model = dyn.mlp(
            (data.x_train.shape[1],) + (width,) * depth + (10,),
            bias=True,
            norm=None if norm == "none" else norm,
            affine=True,
        )
    elif dataset == "cifar10":
        data = dyn.data.cifar10(data_root, seed=0, normalize="standard")
        channels = tuple(width * 2**i for i in range(depth))
        model = dyn.cnn(
            data.x_train.shape[1:],
            channels,
            10,
            stride=2,
            pool="avg",
            bias=True,
            norm=None if norm == "none" else norm,
            affine=True,
        )
    else:
        raise ValueError(f"dataset: must be 'digits' or 'cifar10', got {dataset!r}")
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        steps=steps,
        record_every=record_every,
        observables=OBSERVABLES,
        slow_every=slow_every,
        batch=batch,
        eval_size=None if dataset == "digits" else 5000,
    )


SWEEP = Sweep(
    name="neural_collapse",
    description="neural collapse (NC1-NC4) of an MLP on all ten digits, square loss, SGD + momentum + wd",
    build=build,
    settings=dict(
        steps=6000,
        record_every=50,
        slow_every=2,
        dataset="digits",
        data_root="",
        width=128,
        depth=2,
        norm="batch",
        batch=128,
    ),
    grid=dict(seed=[0, 1, 2], lr=[0.1], momentum=[0.9], weight_decay=[5e-4]),
    scales=dict(
        paper=dict(
            dataset="cifar10",
            data_root="data/cifar-10-batches-py",
            width=64,
            depth=3,
            norm="batch",
            steps=136500,
            record_every=1365,
            slow_every=5,
        )
    ),
)
