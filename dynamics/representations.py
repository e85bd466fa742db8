"""Hidden representations on a fixed probe set, how far training moves a network from its
initialization, and the identical-output constructions of Choi et al.

Observables (`dyn.Observable` factories, recorded and stored like built-ins):
  relative_distance       ||W_k(t) - W_k(0)||_F / ||W_k(0)||_F per layer (Li & Liang 2018);
  flipped_patterns        per hidden layer, the fraction of (probe input, unit) pairs whose
                          activation pattern 1[z > 0] differs from the one at initialization;
  representation_statistics  per hidden layer on the probe set: fraction of zeros, dead units,
                          numerical and effective rank, mean |correlation| between units,
                          activation amplitude (Choi, Lee, Shin, Rhee, arXiv 1811.03666);
  update_singular_values  singular values of W_k(t) - W_k(0) (Li & Liang's low-rank update).

Hidden layers. Most of these need each hidden layer's pre-activations on probe inputs, which
`Model.apply` does not expose. A *hidden function* `hidden(params, x) -> (pre, rep)` gives them:
pre[k], rep[k] of shape (n, m_k) are the pre-activations and the representation (the
activation's output) of hidden layer k = 0..H-1, the weight layers before the output.
`mlp_hidden(model)` builds it for a plain `dyn.mlp` from the model's `Model.dense` description
(activation, bias, NTK multipliers); `resnet_one_neuron_hidden` for `dyn.resnet_one_neuron`;
`dense_forward` for dense layers with one activation per layer. The limit: a network with
normalization, weight normalization or convolutions has no `Model.dense` description, and its
hidden layers come from a function the user writes (any callable of that signature).

Per-layer observables have dims ("layer",) with one entry per weight layer (params[k], as in
every observable of the library) and NaN where a layer has no hidden representation (the
output layer).

Identical-output constructions (Choi et al., section "identical output network"): functions of
(params, activations) returning new params whose network computes the same outputs while a
hidden representation's statistics change: `insert_linear_layer` (an identity layer whose
representation is linear), `affine_identical_output` (any invertible affine map of a linear
layer's representation, undone in the next layer), `rescale_units` (positive rescaling of a
ReLU or linear layer) and `append_dead_units`. They run on the host (NumPy, float64) and give
params for `dense_forward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import models as _models
from dynamics import observables as _obs
from dynamics.models import ACTIVATIONS, Model, layer_weight, layer_weights
from dynamics.recording import Observable

__all__ = [
    "PROBE_FIELDS",
    "REPRESENTATION_STATS",
    "activation_amplitude",
    "affine_identical_output",
    "append_dead_units",
    "dead_units",
    "dense_forward",
    "effective_rank",
    "flipped_patterns",
    "insert_linear_layer",
    "mean_abs_correlation",
    "mlp_hidden",
    "relative_distance",
    "representation_rank",
    "representation_statistics",
    "rescale_units",
    "resnet_one_neuron_hidden",
    "update_singular_values",
    "zero_fraction",
]

PROBE_FIELDS = ("x_train", "x_eval", "x_test")
# activations with act(s z) = s act(z) for s > 0: units may be rescaled through them
_HOMOGENEOUS = ("relu", "linear")


# --------------------------------------------------------------------------- hidden layers


def _check_activations(activations, n_hidden: int) -> tuple[str, ...]:
    activations = tuple(activations)
    if len(activations) != n_hidden:
        raise ValueError(
            f"activations: {len(activations)} given for {n_hidden} hidden layers "
            "(one per weight layer before the output)"
        )
    for a in activations:
        if a not in ACTIVATIONS:
            raise ValueError(f"activations: unknown activation {a!r}; known: {tuple(ACTIVATIONS)}")
    return activations


def dense_forward(params, x, activations: Sequence[str], multipliers=None):
    """A dense network with one activation per hidden layer, returning its hidden layers.

    h_0 = flatten(x);  z_k = c_k h_{k-1} W_k^T + b_k,  h_k = act_k(z_k)  (k = 1..L-1);
    y = c_L h_{L-1} W_L^T + b_L.  params: [{"w": W_k (out, in), optional "b": (out,)}, ...]
    (any weight form of `models.layer_weight`); activations: L-1 names of
    `models.ACTIVATIONS`; multipliers: L factors c_k (default 1; `Model.dense.multipliers` of
    an NTK-parameterized `dyn.mlp`). Returns (y (n, out), [z_k (n, m_k)], [h_k (n, m_k)]).
    """
    _models.check_params(params)
    acts = _check_activations(activations, len(params) - 1)
    mults = (1.0,) * len(params) if multipliers is None else tuple(multipliers)
    if len(mults) != len(params):
        raise ValueError(f"multipliers: {len(mults)} given for {len(params)} layers")
    h = jnp.reshape(x, (x.shape[0], -1))
    pre, rep = [], []
    for k, p in enumerate(params):
        w = layer_weight(p)
        if w.ndim != 2:
            raise ValueError(
                f"params: layer {k} has a weight of shape {w.shape}, not dense (out, in)"
            )
        if w.shape[1] != h.shape[1]:
            raise ValueError(
                f"params: layer {k} takes {w.shape[1]} inputs but receives {h.shape[1]}"
            )
        z = mults[k] * (h @ w.T)
        if "b" in p:
            z = z + p["b"][None, :]
        if k == len(params) - 1:
            return z, pre, rep
        h = ACTIVATIONS[acts[k]](z)
        pre.append(z)
        rep.append(h)
    raise AssertionError("unreachable")


def mlp_hidden(model: Model) -> Callable:
    """The hidden function `(params, x) -> (pre, rep)` of a plain `dyn.mlp` (see the module
    docstring), read from `model.dense`; ValueError for a model without that description (batch
    norm, weight norm, convolutions, users' models: write the function yourself)."""
    net = getattr(model, "dense", None)
    if net is None:
        raise ValueError(
            "hidden: the model is not a plain dyn.mlp (no Model.dense description: "
            "normalization, weight norm, convolutions or a user's model); pass "
            "hidden=fn(params, x) -> (pre-activations, representations) instead"
        )
    acts = (net.activation,) * (len(net.widths) - 2)
    mults = tuple(net.multipliers)

    def hidden_fn(params, x):
        _, pre, rep = dense_forward(params, x, acts, mults)
        return pre, rep

    return hidden_fn


def resnet_one_neuron_hidden(params, x):
    """Hidden function of `dyn.resnet_one_neuron` (Lin & Jegelka 2018): for block k,
    z_k = U_k x_{k-1} + b_k (n, 1), the block's one neuron relu(z_k), and
    x_k = x_{k-1} + relu(z_k) V_k^T. Returns ([z_k], [relu(z_k)])."""
    h = jnp.reshape(x, (x.shape[0], -1))
    pre, rep = [], []
    for p in params[:-1]:
        z = h @ p["w"].T + p["b"][None, :]
        r = jax.nn.relu(z)
        h = h + r @ p["w2"].T
        pre.append(z)
        rep.append(r)
    return pre, rep


def _as_hidden(hidden) -> Callable:
    if isinstance(hidden, Model):
        return mlp_hidden(hidden)
    if not callable(hidden):
        raise ValueError(
            f"hidden: expected a dyn.mlp Model or a function (params, x) -> (pre, rep), got "
            f"{type(hidden).__name__}"
        )
    return hidden


def _probe_fn(probe, n_probe: int | None) -> Callable:
    """ctx -> the probe inputs: a RunData field by name, or fixed inputs (baked in)."""
    if isinstance(probe, str):
        if probe not in PROBE_FIELDS:
            raise ValueError(f"probe: a field name must be one of {PROBE_FIELDS}, got {probe!r}")
        if n_probe is None:
            return lambda ctx: getattr(ctx.data, probe)
        return lambda ctx: getattr(ctx.data, probe)[:n_probe]
    x = np.asarray(probe, np.float32)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"probe: expected inputs of shape (n, ...), got {x.shape}")
    x = x if n_probe is None else x[:n_probe]
    return lambda ctx: jnp.asarray(x)


def _per_layer(values: list, n_layers: int) -> jax.Array:
    """Hidden-layer scalars padded with NaN to one entry per weight layer."""
    if len(values) >= n_layers:
        raise ValueError(
            f"hidden: {len(values)} hidden layers for a network of {n_layers} weight layers "
            "(the output layer has no hidden representation)"
        )
    pad = [jnp.full((), jnp.nan, jnp.float32)] * (n_layers - len(values))
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values] + pad)


# --------------------------------------------------------------------------- statistics


def zero_fraction(h) -> jax.Array:
    """Fraction of exact zeros of a representation h (n, m): mean_{i,j} 1[h_ij = 0]."""
    return jnp.mean((h == 0).astype(jnp.float32))


def dead_units(h) -> jax.Array:
    """Number of units (columns of h (n, m)) that are 0 on every probe input (never active)."""
    return jnp.sum(jnp.all(h == 0, axis=0).astype(jnp.float32))


def activation_amplitude(h) -> jax.Array:
    """Mean |h_ij| of a representation h (n, m) (Choi et al.'s activation amplitude)."""
    return jnp.mean(jnp.abs(h))


def _svals(h) -> jax.Array:
    # singular values through the library's spectra (the compiled kernel on the CPU, and one
    # LAPACK call per matrix under vmap on several CPU devices, which would deadlock batched)
    return _obs.singular_values([{"w": h}])[0]


def representation_rank(h, tol: float = 1e-3) -> jax.Array:
    """Numerical rank of a representation matrix h (n, m): #{i : s_i(h) / ||h||_F > tol}, the
    definition REPRODUCTIONS.md uses for weights (0 for h = 0)."""
    s = _svals(h)
    fro = jnp.sqrt(jnp.sum(s**2))
    return jnp.sum(s > tol * fro).astype(jnp.float32)


def effective_rank(h) -> jax.Array:
    """Effective rank of h (n, m) (Roy & Vetterli 2007): exp(-sum_i p_i log p_i) with
    p_i = s_i / sum_j s_j the normalized singular values, between 1 and min(n, m); 0 for h = 0."""
    s = _svals(h)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(ent), 0.0)


def mean_abs_correlation(h, rel_eps: float = 1e-6) -> jax.Array:
    """Mean |Pearson correlation| over pairs of units of h (n, m), across the n probe inputs:

        rho_ij = cov(h_i, h_j) / (std h_i std h_j),  mean over pairs i < j of |rho_ij|,

    over units whose std exceeds rel_eps times the largest (constant units, dead ones among
    them, have no correlation). NaN with fewer than two such units. Cost O(n m^2)."""
    hc = h - jnp.mean(h, axis=0, keepdims=True)
    std = jnp.sqrt(jnp.mean(hc**2, axis=0))
    live = std > rel_eps * jnp.max(std)
    safe = jnp.where(live, std, 1.0)
    z = jnp.where(live[None, :], hc / safe[None, :], 0.0)
    corr = (z.T @ z) / h.shape[0]
    pair = live[:, None] & live[None, :] & ~jnp.eye(h.shape[1], dtype=bool)
    n_pairs = jnp.sum(pair)
    total = jnp.sum(jnp.where(pair, jnp.abs(corr), 0.0))
    return jnp.where(n_pairs > 0, total / jnp.maximum(n_pairs, 1), jnp.nan)


REPRESENTATION_STATS: dict[str, tuple[Callable, str]] = {
    "zero_frac": (zero_fraction, "fraction of zeros of the representation on the probe set"),
    "dead": (dead_units, "units never active (0 on every probe input)"),
    "rank": (None, "numerical rank of the representation matrix (s_i / ||H||_F > tol)"),
    "eff_rank": (effective_rank, "effective rank exp(entropy of normalized singular values)"),
    "abs_corr": (mean_abs_correlation, "mean |correlation| between units over the probe set"),
    "amplitude": (activation_amplitude, "mean |h| of the representation on the probe set"),
}


# --------------------------------------------------------------------------- observables


def relative_distance(name: str = "rel_dist") -> Observable:
    """Observable: ||W_k(t) - W_k(0)||_F / ||W_k(0)||_F for every layer k (weights only, biases
    excluded; effective weights of weight-normed layers), the relative distance from
    initialization of Li & Liang 2018 and Du et al. 2019; NaN for a layer initialized at 0.
    dims ("layer",)."""

    def fn(ctx):
        now, init = layer_weights(ctx.params), layer_weights(ctx.init_params())
        out = []
        for w, w0 in zip(now, init, strict=True):
            n0 = jnp.linalg.norm(w0)
            out.append(
                jnp.where(n0 > 0, jnp.linalg.norm(w - w0) / jnp.where(n0 > 0, n0, 1.0), jnp.nan)
            )
        return jnp.stack(out)

    return Observable(
        name, fn, dims=("layer",), doc="||W_k(t) - W_k(0)||_F / ||W_k(0)||_F (weights only)"
    )


def flipped_patterns(
    probe, hidden, *, name: str = "flipped", n_probe: int | None = None
) -> Observable:
    """Observable: per hidden layer k, the fraction of (probe input x, unit i) pairs whose
    activation pattern changed since initialization,

        mean_{x, i} 1[ 1[z_ki(x; t) > 0] != 1[z_ki(x; 0) > 0] ],

    z_k the pre-activations (Li & Liang 2018's "activation patterns": most do not change when
    the network is wide). probe: a RunData field name ("x_train", "x_eval", "x_test"; the first
    n_probe rows) or fixed inputs (n, ...); hidden: a `dyn.mlp` Model or a hidden function (see
    the module docstring). dims ("layer",), NaN at the output layer."""
    hidden_fn = _as_hidden(hidden)
    get = _probe_fn(probe, n_probe)

    def fn(ctx):
        x = get(ctx)
        pre, _ = hidden_fn(ctx.params, x)
        pre0, _ = hidden_fn(ctx.init_params(), x)
        flips = [
            jnp.mean(((z > 0) != (z0 > 0)).astype(jnp.float32))
            for z, z0 in zip(pre, pre0, strict=True)
        ]
        return _per_layer(flips, len(ctx.params))

    return Observable(
        name,
        fn,
        dims=("layer",),
        doc="fraction of (probe input, unit) activation patterns 1[z > 0] changed since init",
    )


def representation_statistics(
    probe,
    hidden,
    *,
    prefix: str = "rep",
    stats: Sequence[str] = tuple(REPRESENTATION_STATS),
    tol: float = 1e-3,
    n_probe: int | None = None,
    costly: bool = False,
) -> tuple[Observable, ...]:
    """Observables `{prefix}_{stat}` of every hidden layer's representation H_k (n_probe, m_k)
    on the probe set (Choi et al., arXiv 1811.03666), one per stat of `stats`:

      zero_frac  mean 1[H = 0];   dead  #units with H[:, i] = 0 on every input;
      rank       #{i : s_i(H) / ||H||_F > tol};   eff_rank  exp(-sum p_i log p_i), p = s / sum s;
      abs_corr   mean over pairs of non-constant units of |corr(H[:, i], H[:, j])| (O(n m^2));
      amplitude  mean |H|.

    probe, hidden, n_probe: as `flipped_patterns`; costly: record them every `slow_every`
    records only (the ranks take an SVD per layer). Each has dims ("layer",), NaN at the
    output layer. Splat the tuple into RunSpec.observables."""
    hidden_fn = _as_hidden(hidden)
    get = _probe_fn(probe, n_probe)
    unknown = [s for s in stats if s not in REPRESENTATION_STATS]
    if unknown or not stats:
        raise ValueError(
            f"stats: unknown statistic {unknown[0] if unknown else None!r}; known: "
            f"{tuple(REPRESENTATION_STATS)}"
        )

    def stat_fn(stat):
        f = (
            (lambda h: representation_rank(h, tol))
            if stat == "rank"
            else REPRESENTATION_STATS[stat][0]
        )

        def fn(ctx):
            _, rep = hidden_fn(ctx.params, get(ctx))
            return _per_layer([f(h) for h in rep], len(ctx.params))

        return fn

    return tuple(
        Observable(
            f"{prefix}_{s}",
            stat_fn(s),
            dims=("layer",),
            costly=costly,
            doc=REPRESENTATION_STATS[s][1] + (f" (tol {tol:g})" if s == "rank" else ""),
        )
        for s in stats
    )


def update_singular_values(
    layer: int = 0, *, name: str = "dw_sv", costly: bool = False
) -> Observable:
    """Observable: the singular values of W_layer(t) - W_layer(0), descending, shape
    (min(out, in),) with dims (name + "_index",). Li & Liang 2018: the accumulated SGD update of
    an over-parameterized two-layer network is close to low rank (a few singular values carry
    most of ||W_t - W_0||_F)."""
    layer = int(layer)

    def fn(ctx):
        ws, w0s = layer_weights(ctx.params), layer_weights(ctx.init_params())
        if not -len(ws) <= layer < len(ws):
            raise ValueError(f"layer: {layer} out of range for {len(ws)} layers")
        return _svals(ws[layer] - w0s[layer])

    return Observable(
        name,
        fn,
        dims=(f"{name}_index",),
        costly=costly,
        doc=f"singular values of W_{layer}(t) - W_{layer}(0), descending",
    )


# --------------------------------------------------------------------------- identical outputs


def _plain_copy(params) -> list[dict]:
    _models.check_params(params)
    out = []
    for k, p in enumerate(params):
        if "w" not in p:
            raise ValueError(f"params: layer {k} has no plain weight 'w' (keys {sorted(p)})")
        out.append({n: np.asarray(v, np.float64) for n, v in p.items()})
    return out


def _cast_like(new: list[dict], old) -> list[dict]:
    dtype = np.asarray(old[0]["w"]).dtype
    return [{n: np.asarray(v, dtype) for n, v in p.items()} for p in new]


def _hidden_index(params, activations, layer: int) -> tuple[str, ...]:
    acts = _check_activations(activations, len(params) - 1)
    if not 0 <= layer < len(params) - 1:
        raise ValueError(f"layer: {layer} is not a hidden layer (0..{len(params) - 2})")
    return acts


def insert_linear_layer(params, activations: Sequence[str], after: int):
    """A network computing the same outputs with one more layer: an identity layer
    {"w": I_m, "b": 0} inserted after hidden layer `after` (width m), whose activation is
    "linear", so its representation equals h_after exactly and can then be moved by
    `affine_identical_output`. Returns (params, activations) for `dense_forward`."""
    acts = _hidden_index(params, activations, after)
    new = _plain_copy(params)
    m = new[after]["w"].shape[0]
    ident = {"w": np.eye(m), "b": np.zeros(m)}
    out = new[: after + 1] + [ident] + new[after + 1 :]
    return _cast_like(out, params), acts[: after + 1] + ("linear",) + acts[after + 1 :]


def affine_identical_output(
    params, activations: Sequence[str], layer: int, A, c=None, multipliers=None
):
    """Identical-output network of Choi et al.: the representation h_k of a *linear* hidden
    layer k replaced by h_k' = A h_k + c (A (m, m) invertible, c (m,)), undone in layer k + 1:

        W_k' = A W_k,  b_k' = A b_k + c;   W_{k+1}' = W_{k+1} A^{-1},
        b_{k+1}' = b_{k+1} - c_{k+1} W_{k+1} A^{-1} c,

    so every output is unchanged (to rounding) while h_k's statistics (correlation, zeros,
    rank of a shifted map) are whatever A and c make them. multipliers: the layers' c_k, as in
    `dense_forward` (default 1). ValueError unless activations[layer] is "linear" (a ReLU does
    not commute with A; for positive diagonal A use `rescale_units`) or A is singular."""
    acts = _hidden_index(params, activations, layer)
    if acts[layer] != "linear":
        raise ValueError(
            f"layer: hidden layer {layer} has activation {acts[layer]!r}; an affine map is undone "
            "in the next layer only for a linear one (insert_linear_layer makes one)"
        )
    new = _plain_copy(params)
    m = new[layer]["w"].shape[0]
    A = np.asarray(A, np.float64)
    if A.shape != (m, m):
        raise ValueError(f"A: expected shape ({m}, {m}) for a layer of width {m}, got {A.shape}")
    cond = np.linalg.cond(A)
    if not np.isfinite(cond) or cond > 1e12:
        raise ValueError(f"A: not invertible (condition number {cond:.3g})")
    c = np.zeros(m) if c is None else np.asarray(c, np.float64)
    if c.shape != (m,):
        raise ValueError(f"c: expected shape ({m},), got {c.shape}")
    mults = (1.0,) * len(params) if multipliers is None else tuple(float(v) for v in multipliers)
    A_inv = np.linalg.inv(A)
    cur, nxt = new[layer], new[layer + 1]
    cur["w"] = A @ cur["w"]
    cur["b"] = A @ cur.get("b", np.zeros(m)) + c
    w_next = nxt["w"] @ A_inv
    nxt["b"] = nxt.get("b", np.zeros(w_next.shape[0])) - mults[layer + 1] * (w_next @ c)
    nxt["w"] = w_next
    return _cast_like(new, params)


def rescale_units(params, activations: Sequence[str], layer: int, s):
    """Identical-output rescaling of hidden layer k's units by s (m,) > 0: row i of W_k and b_k
    times s_i, column i of W_{k+1} divided by s_i. Exact for positively homogeneous activations
    (ReLU, linear: act(s z) = s act(z)). The zeros, dead units, correlations and exact rank of
    h_k do not change (each unit's scale cancels); the amplitude does, and so do the numerical
    rank (its tolerance is relative to ||H||_F) and the effective rank (normalized singular
    values): those two are not invariant under identical-output maps either."""
    acts = _hidden_index(params, activations, layer)
    if acts[layer] not in _HOMOGENEOUS:
        raise ValueError(
            f"layer: activation {acts[layer]!r} of hidden layer {layer} does not commute with a "
            f"rescaling (only {_HOMOGENEOUS})"
        )
    new = _plain_copy(params)
    m = new[layer]["w"].shape[0]
    s = np.broadcast_to(np.asarray(s, np.float64), (m,))
    if not np.all(s > 0):
        raise ValueError("s: scales must be positive")
    new[layer]["w"] = new[layer]["w"] * s[:, None]
    if "b" in new[layer]:
        new[layer]["b"] = new[layer]["b"] * s
    new[layer + 1]["w"] = new[layer + 1]["w"] / s[None, :]
    return _cast_like(new, params)


def append_dead_units(params, activations: Sequence[str], layer: int, n: int, seed: int = 0):
    """Identical-output network with n dead units appended to hidden layer k: incoming weights
    0 and, where the layer has a bias, bias -1 for ReLU (0 otherwise), so the units output
    act(z) = 0 on every input; their outgoing weights (new columns of W_{k+1}) are random,
    N(0, 1/m), and never reach the output. The dead count of h_k and its fraction of zeros
    rise; outputs, numerical and effective rank (zero columns add no singular value) and the
    live units' correlations do not change."""
    acts = _hidden_index(params, activations, layer)
    if int(n) < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    n = int(n)
    new = _plain_copy(params)
    cur, nxt = new[layer], new[layer + 1]
    m, d_in = cur["w"].shape
    if float(ACTIVATIONS[acts[layer]](jnp.zeros(()))) != 0.0:
        raise ValueError(f"layer: activation {acts[layer]!r} is not 0 at 0: no dead unit exists")
    cur["w"] = np.concatenate([cur["w"], np.zeros((n, d_in))])
    if "b" in cur:
        fill = -1.0 if acts[layer] == "relu" else 0.0
        cur["b"] = np.concatenate([cur["b"], np.full(n, fill)])
    rng = np.random.default_rng(seed)
    cols = rng.standard_normal((nxt["w"].shape[0], n)) / np.sqrt(m)
    nxt["w"] = np.concatenate([nxt["w"], cols], axis=1)
    return _cast_like(new, params)
