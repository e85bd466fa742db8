"""P1, low-rank bias of SGD with weight decay (Galanti, Siegel, Gupte, Poggio, arXiv 2206.05794).

The authors' protocol (their code, TomerGalanti/LowRankBias at 044f060; notes with every
citation in docs/protocols/P1.md), which every scale here runs:

- Model (models/mlp.py:20-32): the input flattened, then `depth` blocks Linear(bias) ->
  BatchNorm1d -> ReLU, then a Linear(bias) classifier. `bias = True` and `activation = relu`
  in every logged MLP run (experiments.csv; utils.py:23-28 builds nn.ReLU). BatchNorm1d is
  PyTorch's default: affine, momentum 0.1, eps 1e-5, running statistics (unbiased running
  variance). Here: `dyn.mlp(widths, bias=True, norm="batch", affine=True, init="pytorch")`.
- Initialization: none of their own (no init call in models/ or train.py), so PyTorch's
  default nn.Linear: W and b ~ U(+-1/sqrt(fan_in)); BN gamma 1, beta 0 (`init="pytorch"`).
- Optimizer (train.py:202-203): optim.SGD(net.parameters(), lr, momentum=0, weight_decay): plain
  SGD whose weight decay is L2 added to the gradient of every parameter, BN's and the biases
  included (`dyn.sgd`, momentum 0 in 3926 of 3933 logged runs). Loss: nn.CrossEntropyLoss
  (mean over the batch).
- Length and batches: EPOCH = 500 of a shuffled DataLoader with drop_last False (utils.py:
  120-123): every batch size trains 500 epochs, the last batch of each epoch partial
  (`RunSpec(epochs=500)`; the runner buckets batch sizes into one program each).
- Schedule (train.py:205, 221-222): MultiStepLR(milestones [60, 100, 200], gamma 0.2) stepped
  as `train_scheduler.step(epoch)` at the START of every epoch, epochs counted from 1; in
  PyTorch 1.11 that takes the closed form lr0 * 0.2 ** bisect_right(milestones, epoch), so
  1-based epoch 60 already runs at 0.2 lr0: 59 epochs at lr0, 40 at 0.2 lr0, 100 at 0.04 lr0,
  301 at 0.008 lr0. `dyn.step_decay` counts epochs from 0, so the milestones m become m - 1.
- Records (train.py:224-247): every SAVE_EPOCH = 10 epochs, before that epoch's training, so
  after 0, 10, 20, ... epochs of training (`record_every=10`: the same instants, plus epoch 500).
  Rank (analysis_rank.py:11-24, train.py:226-231): #{sigma_i(W / ||W||_F) > tol}, tol = 1e-3
  (every logged run), for the Linear layers in `model.layers`: the input layer and the hidden
  ones, NOT the classifier `fc`; avg_rank is their mean (`rank_layers=range(depth)`,
  `mean_rank`). The singular values are saved too (analysis_rank.py:67-118; their plots
  recount ranks from them at other tolerances) (`sv`). Accuracy and loss (train.py:101-147)
  in eval mode (`net.eval()`: BN's running statistics) over the whole training set
  (`eval_mode="eval"`, `eval_size=None`).
- "dist" (analysis_convergence.py, train.py:254-257): once per epoch, the mean over the
  `model.layers` weights plus fc of ||W_after - W_before||_F / ||W_before||_F (normalize_dist
  True in 3091 rows), where the fc term is always 0 (its tensor is not cloned) but counts in the
  denominator. The value stored at a checkpoint is the change during the epoch before it. Here
  `dist_layer` is that change over the last epoch of each record interval for every layer
  (the classifier's real change included); figures/low_rank.py forms the authors' number,
  sum over the input and hidden layers / (depth + 1), and `dist` (the mean over all layers).
- Grid (experiments.csv, 919 runs of the depth-10 width-100 MLP on CIFAR-10): lr 0.1 with wd
  in {1e-4, 2e-4, 4e-4, 8e-4} (plus 0 and 6e-3 once per batch size), B in {4, 8, 16, 32, 64,
  128}; an lr sweep {0.001, 0.01, 0.5, 1} over wd {0, 1e-4, 2e-4, 4e-4, 8e-4, 6e-3}. Their
  repeats are unseeded (no manual_seed anywhere).
- Data (global_settings.py:16-20, utils.py:77-123): CIFAR-10, ToTensor then Normalize with
  CIFAR-100's per-channel mean and std (their constants, applied to CIFAR-10), no
  augmentation (rnd_aug False in every run).
- Not kept: their early stop (train.py:262-267: stop when train accuracy <= 15% at 3
  checkpoints after epoch 50); runs that do not fit their training data are flagged in the
  figure instead.

CPU scale (the default): only scale knobs move. Data set: sklearn's digits (1438 training
images of 8x8, 10 classes, standardized per pixel with the training split's statistics; the 3
pixels constant on it are dropped, see `dataset`) in place of CIFAR-10; depth 4 and width 64 in
place of 10 and 100; one seed; the lr grid {0.1, 1} (two of the authors' {0.001, 0.01, 0.1, 0.5,
1}). The wd grid is the authors' {0, 1e-4, 2e-4, 4e-4, 8e-4, 6e-3}, B their {4, ..., 128};
everything else above is unchanged (500 epochs at every batch size, the milestones, tol 1e-3).
No epoch ends in a batch of one example for these B (1438 = 4k + 2): PyTorch's BatchNorm1d
refuses a training batch of one, and CIFAR-10's 50000 never leaves one either.
What the scale costs: an epoch of digits is ceil(1438 / B) steps, 35x fewer than CIFAR-10's, so
the weight decay applied over a run, sum_t lr_t wd, is 35x smaller (B=4, lr 0.1, wd 8e-4: 2.1
here against 73 on CIFAR-10); figures/low_rank.py draws the rank against it. Cost: 72 runs,
about 140-190 CPU-seconds; measured on the shared 2-core machine, 9.0 min of wall time from a
cold start (compile 143 s, run 386 s, under a load of 9-13) and 3.4 min with the compiled
programs cached (compile 9 s, run 188 s, load ~5).

`--set scale=paper`: exactly the authors' protocol: CIFAR-10 from `data_root` (the "python
version" batches) with their normalization, depth 10, width 100, lr {0.001, 0.01, 0.1, 0.5, 1},
wd {0, 1e-4, 2e-4, 4e-4, 8e-4, 6e-3}, B {4, ..., 128}, three seeds (a GPU job: 6.25M steps per
run at B=4).
"""

import numpy as np

import dynamics as dyn
from sweeps import Sweep

OBSERVABLES = (
    "loss",
    "accuracy",
    "test_accuracy",
    "sv",
    "rank",
    "mean_rank",
    "layer_norm",
    "dist",
    "dist_layer",
)

# CIFAR-100's per-channel statistics, which the authors apply to CIFAR-10
# (conf/global_settings.py:16-20).
CIFAR_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)


def dataset(data, data_root, n_train):
    """The training data: digits standardized per pixel, or CIFAR-10 as the authors normalize
    it, (x / 255 - mean_c) / std_c with CIFAR-100's mean_c, std_c."""
    if data == "digits":
        ds = dyn.data.digits(seed=0, normalize="standard", n_train=n_train)
        # pixels constant on the training images (3 of 64 in the full split) feed columns of the
        # input layer that get no gradient and only decay: a rank drop that says nothing about
        # SGD (CIFAR-10 has no constant pixel), so they are left out
        keep = ds.x_train.std(axis=0) > 0
        return dyn.data.Dataset(
            ds.x_train[:, keep], ds.y_train, ds.x_test[:, keep], ds.y_test, ds.num_classes, ds.name
        )
    if data == "cifar10":
        ds = dyn.data.cifar10(data_root, seed=0, n_train=n_train, normalize="scale")
        mean = np.asarray(CIFAR_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(CIFAR_STD, np.float32).reshape(1, 3, 1, 1)
        return dyn.data.Dataset(
            (ds.x_train - mean) / std,
            ds.y_train,
            (ds.x_test - mean) / std,
            ds.y_test,
            ds.num_classes,
            ds.name,
        )
    raise ValueError(f"data: must be 'digits' or 'cifar10', got {data!r}")


def build(epochs, record_every, width, depth, milestones, data, data_root, n_train):
    if depth < 1:
        raise ValueError(f"depth: the MLP needs at least one hidden layer, got {depth}")
    ds = dataset(data, data_root, n_train)
    d_in = int(np.prod(ds.x_train.shape[1:]))
    model = dyn.mlp(
        (d_in,) + (width,) * depth + (ds.num_classes,),
        bias=True,
        norm="batch",
        affine=True,
        init="pytorch",
    )
    # their scheduler.step(epoch) at the start of 1-based epoch e: 0.2^#{m <= e}; ours counts
    # 0-based epochs, e0 = e - 1
    schedule = dyn.step_decay(tuple(int(m) - 1 for m in milestones), 0.2) if milestones else None
    return dyn.RunSpec(
        model=model,
        data=ds,
        loss="cross_entropy",
        stepper=dyn.sgd,
        epochs=epochs,
        record_every=record_every,
        lr_schedule=schedule,
        observables=OBSERVABLES,
        rank_tol=1e-3,
        rank_layers=tuple(range(depth)),  # input and hidden layers, not the classifier
        eval_mode="eval",
        eval_size=None,
    )


SWEEP = Sweep(
    name="low_rank",
    description="P1 low-rank bias of SGD + weight decay (authors' protocol): BN-MLP, 500 epochs, "
    "rank at 1e-3 and 'dist' vs B, wd, lr",
    build=build,
    settings=dict(
        epochs=500,
        record_every=10,
        width=64,
        depth=4,
        milestones=(60, 100, 200),
        data="digits",
        data_root="data",
        n_train=None,
    ),
    grid=dict(
        seed=[0],
        lr=[0.1, 1.0],
        batch_size=[4, 8, 16, 32, 64, 128],
        weight_decay=[0.0, 1e-4, 2e-4, 4e-4, 8e-4, 6e-3],
    ),
    scales=dict(
        paper=dict(
            data="cifar10",
            n_train=None,
            width=100,
            depth=10,
            seed=[0, 1, 2],
            lr=[0.001, 0.01, 0.1, 0.5, 1.0],
            batch_size=[4, 8, 16, 32, 64, 128],
            weight_decay=[0.0, 1e-4, 2e-4, 4e-4, 8e-4, 6e-3],
        )
    ),
)
