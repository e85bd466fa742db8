"""Neural collapse under the square loss (Papyan, Han, Donoho, PNAS 2020; under MSE: Han,
Papyan, Donoho, ICLR 2022), the multi-class face of Xu et al. (2023).

The P2 authors' repository has no neural-collapse code (protocol_P2.md section 9), so the
protocol is Papyan et al.'s and Han et al.'s, from the papers: the square loss on one-hot
labels of all classes (mean over the batch and the C outputs), SGD with momentum 0.9 and weight
decay 5e-4 (L2 in the gradient, every parameter), batch 128 of shuffled epochs, 350 epochs with
the learning rate divided by 10 at epochs 117 and 233 (a third and two thirds), no
augmentation, PyTorch's default initialization; trained far past 100% training accuracy (the
terminal phase), the statistics of the penultimate features of the whole training set in eval
mode (BN running statistics): nc1 = trace(S_W S_B^+)/C; nc2 = mean |cos + 1/(C-1)| over
pairs of centred class means, nc2_cos -> -1/(C-1), nc2_equinorm; nc3 = classifier vs centred
class means; nc4 = classifier vs nearest class mean; cdnv (`dynamics.observables.
neural_collapse`, which agrees with Papyan et al.'s and rhubarbwu/neural-collapse's code on the
same features). These are costly and recorded every `slow_every` records.

CPU scale (the default): all ten digits classes (1437 training images, standardized per pixel)
and, in place of their VGG / ResNet / DenseNet, an MLP 64 -> 128 -> 128 -> 10 with biases and
batch norm (affine, before the ReLUs as in their conv nets), PyTorch's default init; 3 seeds.
350 epochs are 4200 steps. lr 0.2: theirs is tuned per network and data set, and here the
collapse depends on it (seed 0, NC1 at epoch 350 over NC1 at init: lr 0.05 1/13, 0.1 1/30,
0.2 1/250, 0.4 1/1500, every one at 100% training and 97-98% test accuracy).

About 20 s of CPU time on 2 cores.

`--set scale=paper`: CIFAR-10 (`data_root` must hold the CIFAR-10 python batches), standardized
per channel, with a small conv net (three 3x3 stride-2 conv + BN + ReLU blocks, global average
pooling, dense classifier) in place of their ResNets, 350 epochs at batch 128, the statistics
on the first 10000 training images; the lr (0.2 here) is theirs to tune (`--set lr=...`).
"""

import functools

import dynamics as dyn
from sweeps import Sweep

OBSERVABLES = ("loss", "accuracy", "test_accuracy", "nc")


def build(epochs, record_every, slow_every, milestones, dataset, data_root, width, depth, batch):
    if dataset == "digits":
        data = dyn.data.digits(seed=0, normalize="standard")
        model = dyn.mlp(
            (data.x_train.shape[1],) + (width,) * depth + (10,),
            bias=True,
            norm="batch",
            affine=True,
            init="pytorch",
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
            norm="batch",
            affine=True,
            init="pytorch",
        )
    else:
        raise ValueError(f"dataset: must be 'digits' or 'cifar10', got {dataset!r}")
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        epochs=epochs,
        record_every=record_every,
        lr_schedule=dyn.step_decay(tuple(milestones), 0.1),
        observables=OBSERVABLES,
        slow_every=slow_every,
        batch=batch,
        eval_mode="eval",
        eval_size=None if dataset == "digits" else 10000,
    )


SWEEP = Sweep(
    name="neural_collapse",
    description="neural collapse (NC1-NC4) on all ten digits, square loss, SGD + momentum + "
    "wd 5e-4, 350 epochs with lr / 10 at 1/3 and 2/3 (Papyan et al.'s protocol)",
    build=build,
    settings=dict(
        epochs=350,
        record_every=5,
        slow_every=2,
        milestones=(117, 233),
        dataset="digits",
        data_root="",
        width=128,
        depth=2,
        batch=128,
    ),
    grid=dict(seed=[0, 1, 2], lr=[0.2], momentum=[0.9], weight_decay=[5e-4]),
    scales=dict(
        paper=dict(
            dataset="cifar10",
            data_root="data/cifar-10-batches-py",
            width=64,
            depth=3,
            record_every=5,
            slow_every=2,
        )
    ),
)
