"""P7 (b): the exact discrete-time identity behind Hoffer et al.'s correction (REPRODUCTIONS.md
P7). With a batch norm after a layer, g(c w) = g(w) / c for each of its rows w; the
weight-decay step w <- (1 - lr lam) w - lr g(w) and the decay-free step w' <- w' - lr' g(w')
with lr' = lr r'^2 / ((1 - lr lam) r^2) (r, r' the two runs' row norms before the step) give
the same new direction. So a run without decay on the hidden weights whose rows step with that
rate (`dyn.steps.norm_matched_lr(form="exact")`, the reference norms logged by the weight-decay
run at every step) follows the weight-decay run's directions, and through them its function,
to float rounding.

The identity needs no momentum (a heavy-ball buffer mixes gradients taken at different norms)
and an exactly scale-invariant layer: the batch norm's eps (1e-5 inside the root in PyTorch
and in the authors' code) adds eps / ||w||^2 to the variance, which the two runs see at
different norms. So this sweep, not the authors' protocol (that is `norm_matters`), runs:
the network of `norm_matters` (digits, 3 hidden layers of 64, Linear + bias -> BN -> ReLU,
PyTorch 0.3 init) with BN eps = 0, full-batch gradient descent in float64 at lr 0.3 (no
momentum) with weight decay 1e-3, 600 steps on the first 256 training images (the
identity does not need more), cross-entropy. `wd` decays every parameter;
`corrected` decays every parameter except the hidden layers' weights, which take the
corrected rate instead: everything else (BN gains and shifts, biases, the classifier) steps
exactly as in `wd`. Measured in exploration: the corrected run's row directions stay within
3e-15 of the weight-decay run's over 2000 steps (lr 0.1 and 0.3; at lr 1.0 the two drift
apart to 4e-12, as a 1-ulp perturbation of the initialization does), while with eps = 1e-5
they drift to 1e-4 (float64) and in float32 to 1e-3, as far as a 1-ulp perturbation of the
initialization drifts there.
"""

import contextlib
import functools

import jax

import dynamics as dyn
from dynamics import steps as dsteps
from sweeps import Sweep
from sweeps.configs.norm_matters import (
    OBSERVABLES,
    bn_mlp,
    cached_reference,
    decay_masks,
    digits_or_mnist,
    directions,
    guarded,
    row_norms,
)

RUNS = ("wd", "corrected")


def build(
    steps,
    record_every,
    run,
    dataset,
    n_train,
    width,
    depth,
    eps,
    precision,
    lr,
    weight_decay,
    ref_seeds,
):
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    data = digits_or_mnist(dataset, n_train=n_train)
    model = bn_mlp(
        data.x_train.shape[1], width, depth, data.num_classes, eps=eps, gamma_init="uniform"
    )
    observables = (*OBSERVABLES, row_norms(depth), directions(depth, hilo=True))

    def spec_with(stepper):
        return dyn.RunSpec(
            model=model,
            data=data,
            loss="cross_entropy",
            stepper=stepper,
            epochs=steps,  # full batch: one step per epoch
            record_every=record_every,
            sampling="full",
            observables=observables,
            eval_size=None,
            precision=precision,
        )

    if run == "wd":
        return spec_with(dyn.sgd)
    make_wd = functools.partial(spec_with, dyn.sgd)
    hp = (float(lr), float(weight_decay), int(data.n_train), 0.0, 1.0)
    key = ("norm_matters_exact", dataset, n_train, width, depth, eps, precision, steps)
    # the reference trains here, before the runner turns on 64-bit mode for the spec
    with jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext():
        ref = cached_reference(key, make_wd, depth, hp, tuple(int(s) for s in ref_seeds))
    scale = dsteps.norm_matched_lr(ref, range(depth), form="exact")
    scale = guarded(scale, lr, weight_decay, 0.0, None, 1, steps)
    mask = decay_masks(depth, "not_hidden_w")
    return spec_with(functools.partial(dyn.sgd, decay_mask=mask, lr_scale=scale))


SWEEP = Sweep(
    name="norm_matters_exact",
    description="P7 the exact identity: full-batch GD in float64 with BN eps 0, wd run vs the "
    "decay-free run at lr r'^2/((1 - lr wd) r^2) per row (directions to float rounding)",
    build=build,
    settings=dict(
        steps=600,
        record_every=30,
        run="wd",
        dataset="digits",
        n_train=256,
        width=64,
        depth=3,
        eps=0.0,
        precision="float64",
        lr=0.3,
        weight_decay=1e-3,
        ref_seeds=(0, 1),
    ),
    grid=dict(seed=[0, 1], lr=[0.3], weight_decay=[1e-3]),
    static=dict(run=list(RUNS)),
)
