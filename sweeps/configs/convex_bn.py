"""P6: batch normalization in a two-layer ReLU network as a convex program (Ergen, Sahiner,
Ozturkler, Pauly, Mardani, Pilanci, arXiv 2103.01499). There is no public code of the authors
(REPRODUCTIONS.md P6), so the protocol is the paper's formulation, built in `dynamics.convex`:

- Network (`convex.bn_network`): f(X) = sum_j relu(gamma_j P X w_j / ||P X w_j|| + alpha_j /
  sqrt(n)) v_j, P = I - 1 1^T / n, BN over the whole batch before the ReLU, no biases.
- Objective: 1/2 ||f(X) - y||^2 + beta/2 sum_j (gamma_j^2 + alpha_j^2 + v_j^2), w_j unpenalized.
  As a run of the library: the loss `half_sum_square` (1/2 sum_i (f_i - y_i)^2 over the batch's
  examples), weight decay beta as L2 (`dyn.sgd`, d = g + beta theta) with
  decay_mask=[{"w": 0}, {}] (gamma, alpha and v decayed, W not), full-batch gradient descent in
  float64: exactly `convex.train_bn_gd`, theta <- theta - lr grad(objective).
- Optimum: the convex program over the exact hyperplane arrangements (`convex.solve_convex_bn`,
  Clarabel) for d = 2; the closed form for d >= n - 1 (`convex.closed_form_bn`, verified against
  the solver in tests/test_convex.py) for d = 50. Recorded: `objective`, `gap` = (objective -
  p*) / p* (in float64, so its sign is exact), `p_star`.
- Whitening invariance (`spectrum`, swept by `convex_bn_whitening`): "original" X; "white", the same U and V with every
  singular value of the centred X set to their geometric mean; "ill", singular values spread
  geometrically over a condition number `condition` about the same geometric mean. The convex
  optimum sees only U' = [1/sqrt(n), U] and is the same for the three; GD is not (the paper's
  implicit bias toward the high-singular-value directions).

CPU scale (REPRODUCTIONS.md): n = 24 points (N(0, I) inputs; y = relu(X a / sqrt(d) + 0.3) -
0.7 relu(X b / sqrt(d)) + 0.1 noise, a planted two-neuron target with a nonzero mean), beta =
0.1, widths m in {8, 40, 100}, 10000 full-batch GD steps at lr 0.05 (0.2 oscillates on this n =
24 instance: measured 100-800% above p*), initialization `bn_network`'s (W ~ N(0, 1/d), gamma,
alpha, v ~ N(0, 1/m)), 4 seeds. `--set scale=paper` runs the paper's sizes for its synthetic
experiments as far as they are stated in REPRODUCTIONS.md (n up to 30, widths up to 100, more
seeds and steps); the arrangements stay exact for d = 2.
"""

import functools
import math

import jax.numpy as jnp
import numpy as np

import dynamics as dyn
from dynamics import convex
from sweeps import Sweep
from sweeps.configs.norm_dynamics import Keyed

SPECTRA = ("original", "white", "ill")
NO_DECAY_ON_W = [{"w": 0.0}, {}]  # decay_mask: gamma, alpha (layer 0) and v (layer 1) only


def half_sum_square(pred, target, weights=None):
    """1/2 sum_i (f(x_i) - y_i)^2 over the examples a batch keeps (weights > 0; None: all),
    the data term of Ergen et al.'s objective (not a mean: the paper's scale)."""
    d = pred.reshape(pred.shape[0]) - target.reshape(pred.shape[0]).astype(pred.dtype)
    keep = jnp.ones_like(d, bool) if weights is None else weights > 0
    return 0.5 * jnp.sum(jnp.where(keep, d**2, 0.0))


def planted(n: int, d: int, seed: int):
    """X ~ N(0, I) (n, d) and y = relu(X a / sqrt(d) + 0.3) - 0.7 relu(X b / sqrt(d)) + 0.1 z
    with a, b, z Gaussian (float64 numpy): a target two BN neurons of either sign can fit."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    a, b = rng.normal(size=d), rng.normal(size=d)
    y = np.maximum(X @ a / math.sqrt(d) + 0.3, 0) - 0.7 * np.maximum(X @ b / math.sqrt(d), 0)
    return X, y + 0.1 * rng.normal(size=n)


def respectrum(X, spectrum: str, condition: float):
    """X with the singular values of its centred part replaced (U, V and the mean kept):
    "original" as is, "white" all equal to their geometric mean g, "ill" g * geomspace(
    sqrt(condition), 1 / sqrt(condition)) (condition number `condition`)."""
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    if spectrum == "original":
        return X
    S = convex.centred_svd(X).S
    g = float(np.exp(np.mean(np.log(S))))
    if spectrum == "white":
        return convex.whiten(X, np.full(S.size, g))
    if not condition >= 1:
        raise ValueError(f"condition must be >= 1, got {condition}")
    c = math.sqrt(condition)
    return convex.whiten(X, g * np.geomspace(c, 1 / c, S.size))


@functools.cache
def problem(n: int, d: int, data_seed: int, spectrum: str, condition: float, beta: float):
    """(X, y, p*) for one static point (cached: build() is called more than once per point).
    p* by the convex program over all arrangements where they can be enumerated, else by the
    closed form (d >= n - 1)."""
    X, y = planted(n, d, data_seed)
    X = respectrum(X, spectrum, condition)
    if convex.centred_svd(X).U.shape[1] == n - 1:
        p_star = convex.closed_form_bn(X, y, beta).value
    else:
        p_star = convex.solve_convex_bn(X, y, beta).value
    return X, y, float(p_star)


def objective_observables(beta: float, p_star: float):
    """`objective` (Ergen et al.'s objective of the network on the whole training set), `gap`
    ((objective - p*) / p*, computed before the float32 cast of the record) and `p_star`."""

    def objective(ctx):
        # beta of the run itself (hp.weight_decay); a run whose decay is not the beta p* was
        # computed for gets a NaN gap rather than a comparison with the wrong optimum
        return convex.bn_objective(
            ctx.params, ctx.data.x_train, ctx.data.y_train, ctx.hp.weight_decay
        )

    def gap(ctx):
        ok = ctx.hp.weight_decay == beta
        return jnp.where(ok, (objective(ctx) - p_star) / p_star, jnp.nan)

    return (
        dyn.Observable(
            "objective",
            Keyed("objective", objective),
            doc="1/2 ||f(X) - y||^2 + beta/2 sum_j (gamma_j^2 + alpha_j^2 + v_j^2)",
        ),
        dyn.Observable(
            "gap",
            Keyed("gap", gap),
            doc="(objective - p*) / p*, p* the convex program's optimum",
        ),
        dyn.Observable(
            "p_star",
            Keyed("p_star", lambda ctx: jnp.asarray(p_star, ctx.data.x_train.dtype)),
            doc="the convex program's optimum p* for this data",
        ),
    )


def build(steps, record_every, n, d, width, spectrum, condition, beta, data_seed):
    beta = float(np.float32(beta))  # the value hp.weight_decay holds (Hparams are float32)
    X, y, p_star = problem(n, d, data_seed, spectrum, float(condition), beta)
    data = dyn.Dataset(X, y, X[:0], y[:0], 0, f"planted-n{n}-d{d}-{spectrum}")
    return dyn.RunSpec(
        model=convex.bn_network(d, width),
        data=data,
        loss=half_sum_square,
        stepper=functools.partial(dyn.sgd, decay_mask=NO_DECAY_ON_W),
        steps=steps,
        record_every=record_every,
        sampling="full",
        observables=("loss", *objective_observables(beta, p_star)),
        eval_size=None,
        precision="float64",
    )


SWEEP = Sweep(
    name="convex_bn",
    description="P6 Ergen et al.: BN two-layer ReLU net by full-batch GD (float64) against its "
    "convex program's optimum; widths 8 / 40 / 100, d = 2 / 50",
    build=build,
    settings=dict(
        steps=10000,
        record_every=100,
        n=24,
        d=2,
        width=40,
        spectrum="original",
        condition=100.0,
        beta=0.1,
        data_seed=0,
    ),
    grid=dict(seed=[0, 1, 2, 3], lr=[0.05], weight_decay=[0.1]),
    static=dict(d=[2, 50], width=[8, 40, 100]),
    scales=dict(
        paper=dict(n=30, steps=40000, record_every=200, width=[10, 40, 100], seed=list(range(10)))
    ),
)
