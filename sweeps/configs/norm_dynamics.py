"""P2, norm dynamics under the square loss (Xu, Rangamani, Liao, Galanti, Poggio, Research 2023).

The authors' protocol (their code, GraceXu182/binaryclassifiers_squareloss at 16f4b31; notes
with every citation in docs/protocols/P2.md), which every scale here runs:

- Data (binary_dataset.py:12-45, train_binary.py:189-208, 431-434, 480-492, 543-554): two
  classes (CIFAR-10 1 = automobile -> output 0, 2 = bird -> output 1), each image standardized
  by fixed per-channel constants (x - mean_c) / std_c, then divided by its own L2 norm over all
  C x H x W values (`--normx1 L2`, train and test); no augmentation. Targets: one-hot over TWO
  outputs.
- Model (extarget.py:668-748, 1664-1684: NetSimpleConv4 of SubBRC blocks): conv(C->w, k3, s2,
  p1), then three times BN -> ReLU -> conv (w->2w k3 s2 p1, 2w->4w k3 s2 p1, 4w->2 with the
  kernel as large as the last map, i.e. a dense layer on the flattened map, no pooling); BN
  non-affine (train_binary.py:300 -> extarget.py:491-495 removes gamma and beta), momentum 0.1,
  eps 1e-5, running statistics; every conv has a bias. `--hasbn 0` (the authors' "no BN")
  drops the BN layers: `norm="none"`. Built here by `authors_net` with their padding (1 on
  every side; `dyn.cnn`'s "zero" padding, XLA's SAME, pads a stride-2 k3 conv of an even map on
  the high side only), PyTorch's default biases (`dyn.cnn`'s frobenius init zeroes them), and
  the convolutions as products with 0/1 patch matrices (XLA's convolution is several times
  slower at 8x8 on the CPU).
- Init (extarget.py:460-527): every conv weight N(0, 0.05^2) rescaled to Frobenius norm s, the
  head included (unit norm at init times the traced `init_scale`); conv biases are NOT touched
  and keep PyTorch's default U(+-1/sqrt(fan_in)), independent of s.
- Loss and optimizer (train_binary.py:347-349, 558): mean((out - onehot)^2) over B x 2 entries;
  torch SGD lr 0.01, momentum 0.9 (heavy ball, no Nesterov), weight_decay 0.01 or 0 as L2 on
  every parameter (conv weights and biases; BN has none); batch 128 of shuffled epochs, the
  last batch partial; no schedule; 1000 epochs.
- rho (complexity.py:17-51): rho_eff = prod_k ||W_k||_F / prod_BN ||sqrt(running_var)||_2
  (observable `rho_eff`; `rho` is their `prod_rho_conv`). Margins (train_binary.py:594-632):
  (t0 - t1)(o0 - o1) / rho on every training minibatch, in train mode, from the forward pass of
  the step (weights before it), with rho through the running_var that pass already updated,
  over one epoch (`authors_train_margins`: the last epoch of every record interval); test
  margins in eval mode (train_binary.py:884-898; `margins_on_test`).

CPU scale (the default): only scale knobs move. Data: sklearn's digits classes 1 vs 2 (the
authors' class indices; 288 training and 71 test 8x8 images, one channel: 3 steps per epoch at
batch 128, the last of 32) standardized by the one channel's mean and std over the whole digits
training split (the authors' constants are CIFAR-10's), then unit L2; width 8 (8/16/32
channels on maps 4x4, 2x2, 1x1, the head dense on 32); 2000 epochs = 6000 steps (theirs:
1000 epochs = 79000 steps; with momentum 0.9 and wd 0.01 a weight decays over
(1 - mu) / (lr wd) = 1000 steps); init scales {0.1, 1, 3, 10} of their {0.01, 0.1, 0.5, 1, 3,
5, 10} (0.01 behaves as 0.1 with BN and, like 0.1, leaves the net without BN dead); 2 seeds
(theirs are single unseeded runs); records every 20 epochs. Everything else above is
unchanged. 32 runs, about 100 s of CPU time on 2 cores (measured: 385 s of wall time on a
2-core machine shared with other jobs at load ~13).

`--set scale=paper`: exactly the authors' runs: CIFAR-10 classes 1 and 2 from `data_root` (the
"python version" batches; 10000 training and 2000 test images) with their normalization
constants, width 32 (32/64/128 channels, head 128x4x4 -> 2), 1000 epochs, their seven init
scales, wd 0 and 0.01, BN and no BN, 3 seeds (a GPU job: 79000 steps per run).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dyn
from dynamics import models as dmodels
from dynamics import observables as dobs
from sweeps import Sweep

NORMS = ("batch", "none")
OBSERVABLES = ("loss", "accuracy", "test_accuracy", "rho", "rho_eff", "layer_norm")

# the authors' per-channel constants (train_binary.py:189-190)
CIFAR_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))


# --------------------------------------------------------------------------- data


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each image divided by its L2 norm over all C x H x W values (their normalize_input)."""
    n = np.sqrt(np.sum(x.reshape(len(x), -1).astype(np.float64) ** 2, axis=1))
    return (x / n.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32)


def binary_task(dataset: str, classes, data_root: str = ""):
    """Two classes as the P2 authors prepare them: labels 0 (classes[0]) and 1 (classes[1]) for
    two one-hot outputs, x standardized per channel by fixed constants, then unit L2 per image.
    x: (n, C, H, W) float32; y: (n,) int32."""
    classes = tuple(int(c) for c in classes)
    if len(classes) != 2 or classes[0] == classes[1]:
        raise ValueError(f"classes: need two different classes, got {classes!r}")
    if dataset == "digits":
        full = dyn.data.digits(seed=0, normalize="scale", image=True)
        mean, std = float(full.x_train.mean()), float(full.x_train.std())
        ds = dyn.data.digits(seed=0, classes=classes, normalize="scale", image=True)
        x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    elif dataset == "cifar10":
        full = dyn.data.cifar10(data_root, seed=0, normalize="scale")
        mean = np.asarray(CIFAR_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(CIFAR_STD, np.float32).reshape(1, 3, 1, 1)

        def pick(x, y):
            keep = np.flatnonzero(np.isin(y, classes))
            return (x[keep] - mean) / std, np.where(y[keep] == classes[0], 0, 1).astype(np.int32)

        x_tr, y_tr = pick(full.x_train, full.y_train)
        x_te, y_te = pick(full.x_test, full.y_test)
    else:
        raise ValueError(f"dataset: must be 'digits' or 'cifar10', got {dataset!r}")
    x_tr, x_te = _unit_rows(x_tr), _unit_rows(x_te)
    name = f"{dataset}{classes[0]}{classes[1]}"
    return dyn.data.Dataset(x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32), 2, name)


# --------------------------------------------------------------------------- model


def _patch_matrix(h: int, w: int, k: int, stride: int, pad: int) -> tuple[np.ndarray, int, int]:
    """P (h*w, ho*wo, k*k) with P[n, q, j] = 1 where input pixel n is entry j of the k x k
    window of output q for a conv of stride `stride` and zero padding `pad` on every side
    (PyTorch's Conv2d(padding=pad)): ho = (h + 2 pad - k) // stride + 1."""
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    P = np.zeros((h * w, ho * wo, k * k), np.float32)
    for oi in range(ho):
        for oj in range(wo):
            for ki in range(k):
                for kj in range(k):
                    i, j = stride * oi - pad + ki, stride * oj - pad + kj
                    if 0 <= i < h and 0 <= j < w:
                        P[i * w + j, oi * wo + oj, ki * k + kj] = 1.0
    return P, ho, wo


def _frobenius(key, shape):
    g = jax.random.normal(key, shape)
    return g / jnp.linalg.norm(g.ravel())


def authors_net(
    in_shape, width: int, *, bn: bool = True, bias: bool = True, lagrange: bool = False
) -> dyn.Model:
    """The P2 authors' NetSimpleConv4 (extarget.py:668-748) at width w, input (C, H, W):

        x1 = conv1(x)                                  C -> w,  k3 s2 p1
        x2 = conv2(relu(BN(x1)))                       w -> 2w, k3 s2 p1
        x3 = conv3(relu(BN(x2)))                       2w -> 4w, k3 s2 p1
        y  = head(h),  h = relu(BN(x3))                4w -> 2, kernel = x3's map (a dense layer
                                                       on the flattened map, PyTorch's order)

    BN (bn=True) is BatchNorm2d without affine parameters: batch statistics over examples and
    space in train mode (running mean and unbiased variance, momentum 0.1, eps 1e-5, as the
    model's state) and the running statistics in eval mode; bn=False is their `--hasbn 0`.
    Init: every weight N(0, 1) rescaled to ||W_k||_F = 1 (the run's hp.init_scale then sets s),
    biases (bias=True) PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in k k.
    lagrange=True: every layer W_k = rho_k V_k ({"v", "rho"}, ||V_k||_F = 1, rho_k = 1 at init;
    for `dyn.normalized_gd`), which needs bias=False, bn=False (f = prod_k rho_k f_V).

    The convolutions are products with fixed 0/1 patch matrices (the same numbers as
    Conv2d(padding=1); on 8x8 inputs 20x faster on the CPU than XLA's convolution). Layer k's
    state holds the BN that follows conv k (so `dyn.rho_eff` divides by its running std).
    """
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"in_shape: expected (C, H, W), got {in_shape}")
    if lagrange and (bias or bn):
        raise ValueError("lagrange: W = rho V with f = rho f_V needs bias=False and bn=False")
    chans = (in_shape[0], width, 2 * width, 4 * width)
    h, w = in_shape[1:]
    patches, maps = [], [(h, w)]
    for _ in range(3):
        P, h, w = _patch_matrix(h, w, 3, 2, 1)
        patches.append(jnp.asarray(P))
        maps.append((h, w))
    shapes = [(chans[i + 1], chans[i], 3, 3) for i in range(3)] + [(2, chans[3], h, w)]
    eps, momentum = 1e-5, 0.1

    def init(key):
        params = []
        for i, shape in enumerate(shapes):
            kw, kb = jax.random.split(jax.random.fold_in(key, i))
            v = _frobenius(kw, shape)
            p = {"v": v, "rho": jnp.ones(())} if lagrange else {"w": v}
            if bias:
                bound = 1.0 / math.sqrt(math.prod(shape[1:]))
                p["b"] = jax.random.uniform(kb, (shape[0],), minval=-bound, maxval=bound)
            params.append(p)
        return params

    def init_state(key):
        return [{"mean": jnp.zeros((c,)), "var": jnp.ones((c,))} for c in chans[1:]] + [{}]

    def conv(p, x, i):
        W = dmodels.layer_weight(p)
        b_, c_ = x.shape[:2]
        cols = jnp.einsum("bcn,nqk->bcqk", x.reshape(b_, c_, -1), patches[i])
        y = jnp.einsum("bcqk,ock->boq", cols, W.reshape(W.shape[0], c_, -1))
        if "b" in p:
            y = y + p["b"][None, :, None]
        return y.reshape((b_, W.shape[0]) + maps[i + 1])

    def run(params, state, x, mask, train):
        x = x.reshape((x.shape[0],) + in_shape)
        new = []
        for i in range(3):
            x = conv(params[i], x, i)
            if bn:
                if train:
                    x, stats = dyn.norms.batch_norm_train(x, mask, eps=eps)
                    s = None
                    if state is not None:
                        old = dyn.norms.BatchStats(state[i]["mean"], state[i]["var"])
                        r = dyn.norms.update_running(old, stats, momentum)
                        s = {"mean": r.mean, "var": r.spread}
                else:
                    st = dyn.norms.BatchStats(state[i]["mean"], state[i]["var"])
                    x, s = dyn.norms.batch_norm_eval(x, st, eps=eps), state[i]
                new.append(s)
            x = jax.nn.relu(x)
        hfeat = x.reshape(x.shape[0], -1)
        W = dmodels.layer_weight(params[3])
        y = hfeat @ W.reshape(2, -1).T
        if "b" in params[3]:
            y = y + params[3]["b"][None, :]
        return dyn.Forward(y, hfeat, None if state is None or not bn else new + [{}])

    def apply(params, x, mask=None):
        return run(params, None, x, mask, True).y

    def apply_features(params, x, mask=None):
        f = run(params, None, x, mask, True)
        return f.y, f.h

    def forward(params, state, x, mask=None, *, train=True, key=None):
        return run(params, state, x, mask, train)

    if not bn:
        return dyn.Model(init, apply, apply_features)
    return dyn.Model(init, apply, apply_features, None, init_state, forward)


# --------------------------------------------------------------------------- observables


class Keyed:
    """A function that compares equal to another by `key` (what it records), not by identity.
    The sweep runner requires every static point to record the same observables, and an
    observable closing over its point's model is a new function at every point."""

    def __init__(self, key, fn):
        self.key, self.fn = key, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __eq__(self, other):
        return isinstance(other, Keyed) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def _margins(pred, y, rho):
    """(t0 - t1)(o0 - o1) / rho for two outputs and labels in {0, 1}: +-1 times o0 - o1."""
    sign = 1.0 - 2.0 * y.astype(pred.dtype)
    return sign * (pred[:, 0] - pred[:, 1]) / rho


def authors_train_margins(model, steps_per_epoch: int, record_every: int):
    """The P2 authors' training margins over one epoch, the last of each record interval:
    at each step of it, the minibatch in train mode at the weights before the step,
    y_n f_n = (t0 - t1)(o0 - o1) / rho_eff with rho_eff through the running variances that
    forward pass has just updated (train_binary.py:540, 594-632). Two observables:
      train_margin_stats (stat: n, sum, sum of squares), summed over that epoch;
      train_margin_lo, the smallest margin of that epoch.
    Mean = sum / n, std = sqrt(sumsq / n - mean^2)."""
    R = steps_per_epoch * record_every

    def margins_of(ctx):
        b = ctx.batch
        keep = b.weights > 0
        params = jax.lax.stop_gradient(ctx.params)
        f = dmodels.forward(model, params, ctx.model_state, b.x, keep, train=True)
        r = dobs.rho_eff(params, f.state if f.state is not None else ())
        return _margins(f.y, b.y, r), keep

    def last_epoch(ctx):
        # t is the same for every run of a vmapped program: a real branch, so the forward pass
        # only runs in the epochs that are recorded
        return (ctx.t - 1) % R >= R - steps_per_epoch

    def stats(ctx):
        def on(ctx):
            m, keep = margins_of(ctx)
            k = keep.astype(jnp.float32)
            return jnp.stack([jnp.sum(k), jnp.sum(k * m), jnp.sum(k * m * m)])

        return jax.lax.cond(last_epoch(ctx), on, lambda ctx: jnp.zeros((3,)), ctx)

    def lo(ctx):
        def on(ctx):
            m, keep = margins_of(ctx)
            return jnp.min(jnp.where(keep, m, jnp.inf))

        return jax.lax.cond(last_epoch(ctx), on, lambda ctx: jnp.full((), jnp.inf), ctx)

    key = (steps_per_epoch, record_every)

    return (
        dyn.Observable(
            "train_margin_stats",
            Keyed(("train_margin_stats", *key), stats),
            dims=("margin_stat",),
            kind="step",
            reduce="sum",
            doc="n, sum, sum of squares of the authors' train margins over the interval's last "
            "epoch (train mode, before each step, rho_eff after the batch's BN update)",
        ),
        dyn.Observable(
            "train_margin_lo",
            Keyed(("train_margin_lo", *key), lo),
            kind="step",
            reduce="min",
            doc="smallest authors' train margin over the interval's last epoch",
        ),
    )


def margins_on_test() -> dyn.Observable:
    """Test margins in eval mode (running statistics): mean, std and min over the test set of
    (t0 - t1)(o0 - o1) / rho_eff (train_binary.py:884-898)."""

    def fn(ctx):
        pred, _ = ctx.predict(ctx.data.x_test, train=False)
        m = _margins(pred, ctx.data.y_test, dobs.rho_eff(ctx.params, ctx.model_state))
        return jnp.stack([jnp.mean(m), jnp.std(m), jnp.min(m)])

    return dyn.Observable(
        "test_margin",
        Keyed("test_margin", fn),
        dims=("test_stat",),
        doc="mean, std, min of the test margins (eval mode) over rho_eff",
    )


# --------------------------------------------------------------------------- spec


def build(epochs, record_every, norm, dataset, classes, data_root, width, batch):
    if norm not in NORMS:
        raise ValueError(f"norm: must be one of {NORMS}, got {norm!r}")
    data = binary_task(dataset, tuple(classes), data_root)
    model = authors_net(data.x_train.shape[1:], width, bn=norm == "batch")
    spe = math.ceil(data.n_train / batch)
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        epochs=epochs,
        record_every=record_every,
        batch=batch,
        observables=(
            *OBSERVABLES,
            *authors_train_margins(model, spe, record_every),
            margins_on_test(),
        ),
        eval_mode="eval",
        eval_size=None,
    )


SWEEP = Sweep(
    name="norm_dynamics",
    description="P2 (authors' protocol): rho_eff and margins of their BN conv net, 2 one-hot "
    "outputs, square loss, SGD + momentum, wd 0 / 0.01, init scales; BN vs no BN",
    build=build,
    settings=dict(
        epochs=2000,
        record_every=20,
        norm="batch",
        dataset="digits",
        classes=(1, 2),
        data_root="",
        width=8,
        batch=128,
    ),
    grid=dict(
        seed=[0, 1],
        lr=[0.01],
        momentum=[0.9],
        weight_decay=[0.0, 0.01],
        init_scale=[0.1, 1.0, 3.0, 10.0],
    ),
    static=dict(norm=["batch", "none"]),
    scales=dict(
        paper=dict(
            dataset="cifar10",
            data_root="data/cifar-10-batches-py",
            classes=(1, 2),
            width=32,
            epochs=1000,
            record_every=10,
            init_scale=[0.01, 0.1, 0.5, 1.0, 3.0, 5.0, 10.0],
            seed=[0, 1, 2],
        )
    ),
)
