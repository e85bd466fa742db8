"""P7 (a): weight decay with batch norm acts through the effective step size lr / ||w||^2, and a
run without weight decay whose per-channel learning rate is corrected by the norm ratio
recovers the weight-decay run (Hoffer, Banner, Golan, Soudry, arXiv 1803.01814, "Norm
matters", section 2 and its figure 1), under the authors' protocol (eladhoffer/norm_matters
at 3b103aa, `normmatters_wd/`; citations in docs/protocols/P7.md section B):

- Runs (`run_all`): `wd` (SGD with wd on every parameter); `no_wd` (wd 0 except on the
  classifier's weight and bias, `sgd_lastlayerwd..._otherlayerswd0`); `corrected` (as no_wd,
  each hidden layer's rows stepping with lr ||w_c||^2 / ||w_c^WD||^2, ||w_c^WD|| the wd run's
  norm of that row at the end of the current epoch, held for the epoch, on the momentum
  buffer: optimizers_lib/custom_sgd.py SGDWDMimic.step). Here: `dyn.sgd(momentum="heavy_ball",
  decay_mask=..., lr_scale=dyn.steps.norm_matched_lr(form="authors"))`, the reference norms
  from the wd run of the same seed (same initialization and batches), trained in `build` with
  the `row_norms` observable recorded every epoch (probes_lib/basic.py: per-output-channel
  L2 norms after each epoch).
- Network (normmatters_wd/models/vgg.py): layer -> BatchNorm (affine, eps 1e-5, momentum 0.1)
  -> ReLU blocks with a bias in every layer, then a plain linear classifier; PyTorch 0.3's
  default init (requirements.txt: torch 0.3.0.post4): weights and biases U(+-1/sqrt(fan_in)),
  BN weight U(0, 1) and bias 0.
- Optimizer (optimizers_lib, main.py): SGD lr 0.1, momentum 0.9 (heavy ball, PyTorch form
  v <- 0.9 v + g, w <- w - lr v), weight decay 5e-4 as L2 on every parameter (BN and biases
  included); lr x 0.1 at each quarter of the run (StepLR(num_epochs // 4, 0.1), stepped per
  epoch); batch 128 of shuffled epochs, the last batch partial; cross-entropy.

CPU scale (what moved): VGG11 on CIFAR-10 (8 conv layers, 80 epochs of 391 steps) becomes an
MLP on sklearn's digits (1437 training, 360 test images, per-pixel standardized as the
authors standardize per channel; no augmentation), 3 hidden layers of 64 units (Linear with
bias -> BN -> ReLU; the classifier Linear 64 -> 10), 400 epochs of 12 steps with the lr drop
at each quarter (100, 200, 300), so that the decay time of the norms, 1 / (2 lr wd / (1 -
mu)) = 1000 steps, fits in the first quarter (80 epochs of 12 steps would not reach it);
3 seeds (the authors ran one). Records every 10 epochs: test accuracy (eval mode), ||W_k||,
lr / ||W_k||^2, each hidden row's norm and direction (`row_norms`, `directions`).

`--set scale=paper` is not the authors' VGG11 (the library's CNN has no VGG11): it runs the
MLP on MNIST (`data_root`) for the authors' 80 epochs with width 256, records every 8 epochs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dyn
from dynamics import steps as dsteps
from sweeps import Sweep
from sweeps.configs.norm_dynamics import Keyed

RUNS = ("wd", "no_wd", "corrected")


# --------------------------------------------------------------------------- data and network


def digits_or_mnist(
    dataset: str, data_root: str = "", data_seed: int = 0, n_train: int | None = None
) -> dyn.Dataset:
    """sklearn digits per-pixel standardized (train statistics), or MNIST from data_root;
    n_train keeps the first n_train training examples."""
    if dataset == "digits":
        return dyn.data.digits(seed=data_seed, normalize="standard", n_train=n_train)
    if dataset == "mnist":
        return dyn.data.mnist(data_root, seed=data_seed, normalize="standard", n_train=n_train)
    raise ValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")


def bn_uniform_gamma(model: dyn.Model) -> dyn.Model:
    """`model` with every batch norm's gamma drawn U(0, 1) at initialization (PyTorch <= 0.3's
    BatchNorm reset_parameters: weight.uniform_(), bias.zero_()), the rest unchanged."""

    def init(key):
        params = model.init(key)
        out = []
        for i, p in enumerate(params):
            if "gamma" in p:
                k = jax.random.fold_in(key, 1000 + i)
                p = {**p, "gamma": jax.random.uniform(k, p["gamma"].shape)}
            out.append(p)
        return out

    return model._replace(init=init)


def bn_mlp(
    d_in: int,
    width: int,
    depth: int,
    classes: int,
    *,
    bn_p: str = "l2",
    eps: float = 1e-5,
    affine: bool = True,
    bias: bool = True,
    gamma_init: str = "ones",
    init: str = "pytorch",
) -> dyn.Model:
    """depth x (Linear(+bias) -> BN -> ReLU), then Linear(width -> classes): BN after every hidden
    layer, the last layer not normalized. gamma_init "uniform": PyTorch 0.3's BN weight U(0, 1)."""
    model = dyn.mlp(
        (d_in,) + (width,) * depth + (classes,),
        bias=bias,
        norm="batch",
        bn_p=bn_p,
        affine=affine,
        eps=eps,
        init=init,
    )
    return bn_uniform_gamma(model) if gamma_init == "uniform" else model


# --------------------------------------------------------------------------- observables


def row_norms(depth: int) -> dyn.Observable:
    """`row_norms` (hidden_layer, row): ||w_i|| of every row of every hidden layer's weight."""
    return dyn.Observable(
        "row_norms",
        Keyed(
            ("row_norms", depth),
            lambda ctx: jnp.stack(dsteps.weight_row_norms(ctx.params, range(depth))),
        ),
        dims=("hidden_layer", "row"),
        doc="||w_i||, every row i of every hidden layer's weight (the BN-invariant scale)",
    )


def row_norms_hilo(depth: int) -> dyn.Observable:
    """Row norms as two float32 parts (hi, lo), hi + lo = the norm to ~1e-14 relative: records
    are float32, and a float64 run's reference norms need more digits than that."""

    def fn(ctx):
        r = jnp.stack(dsteps.weight_row_norms(ctx.params, range(depth)))
        hi = r.astype(jnp.float32)
        return jnp.stack([hi, (r - hi.astype(r.dtype)).astype(jnp.float32)])

    return dyn.Observable(
        "row_norms_hilo", Keyed(("row_norms_hilo", depth), fn), dims=("part", "hidden_layer", "row")
    )


def directions(depth: int, hilo: bool = False) -> dyn.Observable:
    """`directions` (hidden_layer, row, col): w_i / ||w_i|| for every hidden row, zero-padded to
    the widest fan-in, so two runs' directions can be compared from the store. hilo=True:
    `directions_hilo` (part, hidden_layer, row, col), two float32 parts whose sum holds a
    float64 run's directions to ~1e-14 (records are float32)."""

    def fn(ctx):
        ws = [ctx.params[k]["w"] for k in range(depth)]
        fan = max(w.shape[1] for w in ws)
        out = []
        for w in ws:
            u = w / jnp.linalg.norm(w, axis=1, keepdims=True)
            out.append(jnp.pad(u, ((0, 0), (0, fan - w.shape[1]))))
        u = jnp.stack(out)
        if not hilo:
            return u
        hi = u.astype(jnp.float32)
        return jnp.stack([hi, (u - hi.astype(u.dtype)).astype(jnp.float32)])

    name = "directions_hilo" if hilo else "directions"
    return dyn.Observable(
        name,
        Keyed((name, depth), fn),
        dims=(("part",) if hilo else ()) + ("hidden_layer", "row", "col"),
        doc="w_i / ||w_i||, every row of every hidden layer (zero-padded to the widest fan-in)"
        + ("; two float32 parts, hi + lo" if hilo else ""),
    )


OBSERVABLES = ("loss", "accuracy", "test_loss", "test_accuracy", "layer_norm", "effective_lr")


# --------------------------------------------------------------------------- the three runs


def decay_masks(depth: int, which: str):
    """decay_mask of `dyn.sgd` per run: "all" (None: every parameter), "last" (the classifier's
    weight and bias only, the authors' no_wd), "not_hidden_w" (every parameter but the hidden
    layers' weights: the exact identity's)."""
    if which == "all":
        return None
    if which == "last":
        return [0.0] * depth + [1.0]
    if which == "not_hidden_w":
        return [{"w": 0.0}] * depth + [{}]
    raise ValueError(f"decay mask must be 'all', 'last' or 'not_hidden_w', got {which!r}")


def guarded(scale: dsteps.LayerScale, lr, weight_decay, momentum, schedule, spe, total):
    """`scale` with NaN factors (the run is marked diverged) when the run's hyperparameters are
    not those its reference was trained with: a correction read off another run's norms is
    only that run's correction."""
    sched = dyn.schedules.resolve(schedule)
    lr32, wd32, mu32 = (jnp.float32(v) for v in (lr, weight_decay, momentum))

    def fn(ctx):
        m = scale.scale_fn(ctx)
        want_lr = lr32 if sched.constant else lr32 * sched(ctx.t, spe, total)
        ok = (ctx.hp.weight_decay == wd32) & (ctx.hp.momentum == mu32) & (ctx.hp.lr == want_lr)
        return jax.tree.map(lambda a: jnp.where(ok, a, jnp.nan), m)

    return dsteps.LayerScale(fn, scale.init_fn)


def reference_norms(spec: dyn.RunSpec, depth: int, hp: dyn.Hparams, seeds) -> list:
    """The wd run `spec` trained once more for each seed, recording its row norms at every
    epoch from initialization on: one array (S, epochs + 1, width) per hidden layer, float64
    where the run is (hi + lo parts). Same key, data and hyperparameters as the sweep runner
    gives the run (`sweeps.programs`: jax.random.key(seed), run_data as an argument)."""
    import dataclasses

    ref_spec = dataclasses.replace(
        spec, observables=(row_norms_hilo(depth),), record_every=1, slow_every=1
    )
    run = jax.jit(jax.vmap(dyn.make_run(ref_spec), in_axes=(None, 0, None)))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    trace = run(hp, keys, dyn.train.run_data(ref_spec))
    if np.any(np.asarray(trace["status"]) != 0):
        raise ValueError("reference: a weight-decay reference run did not finish")
    parts = np.asarray(trace["row_norms_hilo"], np.float64)  # (S, R+1, 2, depth, width)
    r = parts[:, :, 0] + parts[:, :, 1]
    return [r[:, :, k] for k in range(depth)]


_REFERENCES: dict = {}


def cached_reference(key: tuple, make_spec, depth: int, hp: tuple, seeds: tuple) -> list:
    """`reference_norms` once per process for `key` (build() runs more than once per point):
    key must name everything the reference spec depends on."""
    k = (key, depth, hp, seeds)
    if k not in _REFERENCES:
        _REFERENCES[k] = reference_norms(make_spec(), depth, dyn.train.as_hparams(hp), seeds)
    return _REFERENCES[k]


def lr_schedule(epochs: int, factor: float = 0.1):
    """StepLR(epochs // 4, 0.1) stepped per epoch: drops at each quarter of the run."""
    q = epochs // 4
    return dyn.step_decay(tuple(q * i for i in (1, 2, 3)), factor)


def build(
    epochs,
    record_every,
    run,
    dataset,
    data_root,
    width,
    depth,
    batch,
    lr,
    weight_decay,
    momentum,
    ref_seeds,
):
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    data = digits_or_mnist(dataset, data_root)
    model = bn_mlp(data.x_train.shape[1], width, depth, data.num_classes, gamma_init="uniform")
    schedule = lr_schedule(epochs)
    observables = (*OBSERVABLES, row_norms(depth), directions(depth))

    def spec_with(stepper, observables=observables):
        return dyn.RunSpec(
            model=model,
            data=data,
            loss="cross_entropy",
            stepper=stepper,
            epochs=epochs,
            record_every=record_every,
            batch=batch,
            lr_schedule=schedule,
            observables=observables,
            eval_size=None,
        )

    heavy = functools.partial(dyn.sgd, momentum="heavy_ball")
    if run == "wd":
        return spec_with(heavy)
    last_only = functools.partial(heavy, decay_mask=decay_masks(depth, "last"))
    if run == "no_wd":
        return spec_with(last_only)
    wd_spec = functools.partial(spec_with, heavy)
    hp = (float(lr), float(weight_decay), int(batch), float(momentum), 1.0)
    key = ("norm_matters", dataset, data_root, width, depth, batch, epochs)
    ref = cached_reference(key, wd_spec, depth, hp, tuple(int(s) for s in ref_seeds))
    spe = wd_spec().steps_per_epoch
    scale = dsteps.norm_matched_lr(ref, range(depth), form="authors", steps_per_epoch=spe)
    scale = guarded(scale, lr, weight_decay, momentum, schedule, spe, epochs * spe)
    return spec_with(functools.partial(last_only, lr_scale=scale))


SWEEP = Sweep(
    name="norm_matters",
    description="P7 Hoffer et al.: BN MLP on digits, SGD+momentum with wd, without wd, and "
    "without wd with the per-channel lr corrected by the wd run's norms",
    build=build,
    settings=dict(
        epochs=400,
        record_every=10,
        run="wd",
        dataset="digits",
        data_root="",
        width=64,
        depth=3,
        batch=128,
        lr=0.1,
        weight_decay=5e-4,
        momentum=0.9,
        ref_seeds=(0, 1, 2),
    ),
    grid=dict(seed=[0, 1, 2], lr=[0.1], weight_decay=[5e-4], momentum=[0.9]),
    static=dict(run=list(RUNS)),
    scales=dict(
        paper=dict(
            dataset="mnist",
            data_root="data/mnist",
            width=256,
            epochs=80,
            record_every=8,  # directions: 3 x 256 x 784 floats a record
        )
    ),
)
