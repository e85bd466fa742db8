"""Batch normalization in a two-layer ReLU network as a convex program (Ergen, Sahiner,
Ozturkler, Pauly, Mardani, Pilanci 2021, arXiv 2103.01499, "Demystifying batch normalization in
ReLU networks: equivalent convex optimization models and implicit regularization").

The network (BN before the ReLU, statistics over the whole batch of n examples):

    BN_j(X w_j) = gamma_j P X w_j / ||P X w_j||_2 + alpha_j 1 / sqrt(n),   P = I - 1 1^T / n,
    f(X) = sum_j relu(BN_j(X w_j)) v_j,
    objective = 1/2 ||f(X) - y||^2 + beta/2 sum_j (gamma_j^2 + alpha_j^2 + v_j^2)

(w_j unpenalized: BN makes f invariant to the scale of w_j). The paper's BN divides by the norm
of the centred pre-activation, not by its standard deviation: ||P z||_2 = sqrt(n) std(z) (the
biased std), so BN_j is the usual batch norm (z - mean) / std with affine scale gamma_j / sqrt(n)
and shift alpha_j / sqrt(n); with this scaling gamma_j^2 + alpha_j^2 is the squared norm of the
BN output, ||BN_j(X w_j)||^2 = gamma_j^2 + alpha_j^2.

Why a convex program. With P X = U S V^T (compact SVD, rank r) and U' = [1/sqrt(n), U] (n, r+1),
P X w / ||P X w|| = U q with q = S V^T w / ||S V^T w|| any unit vector of R^r, so
BN_j(X w_j) = U' z_j with z_j = (alpha_j, gamma_j q_j) free in R^{r+1}, ||z_j||^2 = gamma_j^2 +
alpha_j^2. The network is a two-layer ReLU network without bias on the data U' (X enters only
through its whitened form), and the convex reformulation of Pilanci & Ergen (2020) applies: over
the hyperplane arrangements D_i = diag(1[U' u >= 0]),

    p* = min 1/2 ||sum_i D_i U' (s_i - s_i') - y||^2 + beta sum_i (||s_i||_2 + ||s_i'||_2)
         s.t. (2 D_i - I) U' s_i >= 0,  (2 D_i - I) U' s_i' >= 0,

equal to the network's optimum once m is at least the number of nonzero s_i, s_i'. Replacing S
(whitening X) changes neither U' nor p*.

Public names: `bn_network` (the Model), `bn_apply`, `bn_apply_features`, `bn_objective`,
`train_bn_gd`, `centred_svd` (`CentredSVD`), `whiten`, `arrangements`, `solve_convex_bn`
(`ConvexBN`), `closed_form_bn`, `network_from_convex`, `convex_objective`. The convex solver
needs the optional extra `dynamics[convex]` (cvxpy with Clarabel; SCS comes with cvxpy).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dynamics.models import Model, Params

# --------------------------------------------------------------------------- the network


def _check_params(params, d=None):
    if not isinstance(params, (list, tuple)) or len(params) != 2:
        raise ValueError("params must be [{'w', 'gamma', 'alpha'}, {'w'}] (two layers)")
    p0, p1 = params
    for name in ("w", "gamma", "alpha"):
        if name not in p0:
            raise ValueError(f"params[0] needs key {name!r}")
    m = p0["w"].shape[0]
    if p0["w"].ndim != 2 or (d is not None and p0["w"].shape[1] != d):
        raise ValueError(f"params[0]['w'] must be (m, d) with d = {d}, got {p0['w'].shape}")
    if p0["gamma"].shape != (m,) or p0["alpha"].shape != (m,):
        raise ValueError(f"params[0]['gamma'] and ['alpha'] must be ({m},)")
    if "w" not in p1 or p1["w"].shape != (1, m):
        raise ValueError(f"params[1]['w'] (v) must be (1, {m})")


def bn_apply_features(params: Params, x, mask=None, eps: float = 0.0):
    """`bn_apply` also returning the hidden features h = relu(BN(X W^T)) (n, m)."""
    x = x.reshape(x.shape[0], -1)
    _check_params(params, x.shape[1])
    p0, p1 = params
    z = x @ p0["w"].T  # (n, m)
    c = jnp.ones((x.shape[0],), z.dtype) if mask is None else mask.astype(z.dtype)
    c = c[:, None]
    count = jnp.sum(c)
    centred = z - jnp.sum(c * z, axis=0, keepdims=True) / count
    # the norm of the centred pre-activation over the kept examples only, so a masked batch
    # gives exactly the smaller batch's outputs on the examples it keeps
    norm = jnp.sqrt(jnp.sum(c * centred**2, axis=0, keepdims=True) + eps)
    bn = p0["gamma"][None, :] * centred / norm + p0["alpha"][None, :] / jnp.sqrt(count)
    h = jax.nn.relu(bn)
    return h @ p1["w"].T, h


def bn_apply(params: Params, x, mask=None, eps: float = 0.0):
    """The paper's BN network,
    f(X) = sum_j relu(gamma_j P X w_j / ||P X w_j|| + alpha_j / sqrt(n)) v_j,  P = I - 1 1^T / n.

    params = [{"w": W (m, d), "gamma": (m,), "alpha": (m,)}, {"w": v (1, m)}]; x: (n, d) (more
    feature axes are flattened) -> f: (n, 1). Statistics (the mean, the norm, n) run over the
    examples `mask` keeps ((n,) bool or 0/1 weights; None keeps all). eps is added under the
    square root of the norm; 0 is the paper's definition (and P X w_j = 0 then gives NaN).
    """
    return bn_apply_features(params, x, mask, eps)[0]


def bn_network(d: int, m: int, *, scale: float = 1.0, eps: float = 0.0) -> Model:
    """Two-layer ReLU network with the paper's batch norm before the ReLU, as a `Model`.

    f(X) = sum_{j<m} relu(gamma_j P X w_j / ||P X w_j||_2 + alpha_j / sqrt(n)) v_j (see
    `bn_apply`). Initialization: W_jk ~ N(0, 1/d) (the scale of W is irrelevant to f), and
    gamma_j, alpha_j, v_j ~ N(0, scale^2 / m), so the output's scale does not grow with m.
    params = [{"w": (m, d), "gamma": (m,), "alpha": (m,)}, {"w": (1, m)}].
    """
    if d < 1 or m < 1:
        raise ValueError(f"bn_network needs d >= 1 and m >= 1, got d={d}, m={m}")

    def init_fn(key):
        kw, kg, ka, kv = jax.random.split(key, 4)
        s = scale / math.sqrt(m)
        return [
            {
                "w": jax.random.normal(kw, (m, d)) / math.sqrt(d),
                "gamma": s * jax.random.normal(kg, (m,)),
                "alpha": s * jax.random.normal(ka, (m,)),
            },
            {"w": s * jax.random.normal(kv, (1, m))},
        ]

    def apply_features(params, x, mask=None):
        return bn_apply_features(params, x, mask, eps)

    return Model(
        init_fn, lambda params, x, mask=None: apply_features(params, x, mask)[0], apply_features
    )


def bn_objective(params: Params, X, y, beta, eps: float = 0.0):
    """1/2 ||f(X) - y||^2 + beta/2 sum_j (gamma_j^2 + alpha_j^2 + v_j^2), f = `bn_apply`.

    X: (n, d), y: (n,), beta >= 0 (traced is fine). W is not penalized (f is invariant to its
    scale). Returns a scalar.
    """
    y = jnp.asarray(y)
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be (n,) = ({X.shape[0]},), got {y.shape}")
    f = bn_apply(params, X, None, eps)[:, 0]
    p0, p1 = params
    reg = jnp.sum(p0["gamma"] ** 2) + jnp.sum(p0["alpha"] ** 2) + jnp.sum(p1["w"] ** 2)
    return 0.5 * jnp.sum((f - y) ** 2) + 0.5 * beta * reg


def train_bn_gd(params: Params, X, y, beta, lr, steps: int, eps: float = 0.0):
    """Full-batch gradient descent on `bn_objective`: theta <- theta - lr grad(objective),
    every parameter (W, gamma, alpha, v) with the same rate, weight decay inside the objective.

    One `lax.scan` of `steps` steps (static); beta and lr may be traced. Returns (params, trace)
    with trace (steps,) the objective before each step.
    """

    def step(p, _):
        value, g = jax.value_and_grad(bn_objective)(p, X, y, beta, eps)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), value

    return lax.scan(step, params, None, length=steps)


# --------------------------------------------------------------------------- whitened data


class CentredSVD(NamedTuple):
    """P X = U diag(S) V^T with P = I - 1 1^T / n: U (n, r), S (r,), V (d, r), mean (d,) the
    column mean of X, r the numerical rank. Up = [1/sqrt(n), U] (n, r+1)."""

    U: np.ndarray
    S: np.ndarray
    V: np.ndarray
    mean: np.ndarray

    @property
    def Up(self) -> np.ndarray:
        n = self.U.shape[0]
        return np.concatenate([np.full((n, 1), 1.0 / math.sqrt(n)), self.U], axis=1)


def centred_svd(X, rtol: float = 1e-10) -> CentredSVD:
    """Compact SVD of the centred data, P X = U diag(S) V^T (float64, numpy), keeping the
    singular values above rtol * max(S). X: (n, d). Raises if P X = 0 (BN is undefined)."""
    X = np.asarray(X, np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be (n, d), got shape {X.shape}")
    mean = X.mean(axis=0)
    U, S, Vt = np.linalg.svd(X - mean, full_matrices=False)
    if S.size == 0 or S[0] == 0:
        raise ValueError("X has no variation across examples: the centred X is zero")
    r = int(np.sum(S > rtol * S[0]))
    return CentredSVD(U[:, :r], S[:r], Vt[:r].T, mean)


def whiten(X, singular_values=None):
    """X with the singular values of its centred part replaced, keeping U, V and the mean:
    X' = U diag(S') V^T + 1 mean^T, S' = singular_values ((r,)) or ones (whitening).
    The BN network's function class and the convex program see only U' = [1/sqrt(n), U], so
    both optima are the same for X and X' (the paper's whitening invariance)."""
    svd = centred_svd(X)
    s = np.ones_like(svd.S) if singular_values is None else np.asarray(singular_values, float)
    if s.shape != svd.S.shape or np.any(s <= 0):
        raise ValueError(f"singular_values must be ({svd.S.size},) and positive, got {s.shape}")
    return (svd.U * s) @ svd.V.T + svd.mean


# --------------------------------------------------------------------------- arrangements


def _dedupe(patterns: np.ndarray) -> np.ndarray:
    patterns = np.unique(patterns.astype(bool), axis=0)
    return patterns[patterns.any(axis=1)]  # D = 0 adds nothing to the program


def arrangements(Up, n_samples: int | None = None, seed: int = 0, max_candidates: int = 200_000):
    """Hyperplane arrangements of the rows of Up: the distinct patterns D = 1[Up u >= 0] over u.

    Up: (n, k) (typically [1/sqrt(n), U] from `centred_svd`). Returns a bool array (P, n), one
    pattern per row, sorted, the all-zero pattern dropped (it contributes nothing).

    n_samples=None: exact enumeration. Every cell of the central arrangement {u: sign(Up u)}
    in R^k (rank k) is a pointed cone with an extreme ray u, where k - 1 independent rows T
    vanish; near u every sign combination on T is realized and the other rows keep their sign.
    So the cells are: for each (k-1)-subset T of rows, u spanning null(Up_T) and -u, the signs
    of Up u off T with all 2^(k-1) combinations on T (all rows that vanish at u, in degenerate
    data). This costs C(n, k-1) 2^k candidates: d = 2 data (k = 3) gives the
    2 (1 + (n-1) + (n-1)(n-2)/2) cells of general position; square Up (k = n, d >= n - 1)
    gives all 2^n patterns directly. Refused (ValueError) past `max_candidates`.
    n_samples=int: patterns of n_samples Gaussian directions u ~ N(0, I_k) (a subset of the
    arrangements, so the convex program over them gives an upper bound on p*).
    """
    Up = np.asarray(Up, np.float64)
    if Up.ndim != 2:
        raise ValueError(f"Up must be (n, k), got shape {Up.shape}")
    n, k = Up.shape
    if n_samples is not None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        u = np.random.default_rng(seed).normal(size=(k, int(n_samples)))
        return _dedupe((Up @ u >= 0).T)
    if np.linalg.matrix_rank(Up) < k:
        raise ValueError(f"Up (n={n}, k={k}) must have full column rank for exact enumeration")
    if k == n:  # square and invertible: every sign pattern of Up u is reached
        if n > 17:
            raise ValueError(f"exact enumeration of 2^{n} patterns refused; pass n_samples")
        return _dedupe(np.array(list(itertools.product([False, True], repeat=n)))[:, ::-1])
    n_cand = math.comb(n, k - 1) * 2**k
    if n_cand > max_candidates:
        raise ValueError(
            f"exact enumeration needs {n_cand} candidates (n={n}, k={k}) > max_candidates; "
            "pass n_samples"
        )
    tol = 1e-10 * np.linalg.norm(Up, axis=1).max()
    out = []
    for T in itertools.combinations(range(n), k - 1):
        _, sv, vt = np.linalg.svd(Up[list(T)])
        if sv[-1] < tol:  # dependent rows: no extreme ray here
            continue
        for u in (vt[-1], -vt[-1]):
            a = Up @ u
            zero = np.flatnonzero(np.abs(a) <= tol)
            base = a > 0
            for signs in itertools.product([False, True], repeat=zero.size):
                p = base.copy()
                p[zero] = signs
                out.append(p)
    return _dedupe(np.array(out))


_enumerate = arrangements  # solve_convex_bn's argument of the same name shadows it


# --------------------------------------------------------------------------- the convex program


class ConvexBN(NamedTuple):
    """A solution of the convex BN program: value p*, s and s_prime (P, k) (one row per
    arrangement, k = r + 1 coordinates in the basis Up), patterns (P, n) bool, the centred SVD
    of X (for mapping back to weights), and which solver produced it."""

    value: float
    s: np.ndarray
    s_prime: np.ndarray
    patterns: np.ndarray
    svd: CentredSVD
    solver: str


def convex_objective(s, s_prime, patterns, Up, y, beta) -> float:
    """1/2 ||sum_i D_i Up (s_i - s_i') - y||^2 + beta sum_i (||s_i|| + ||s_i'||) in float64;
    s, s_prime (P, k), patterns (P, n), Up (n, k), y (n,)."""
    A = Up @ (np.asarray(s) - np.asarray(s_prime)).T  # (n, P)
    f = np.sum(np.asarray(patterns, float) * A.T, axis=0)
    reg = np.linalg.norm(s, axis=1).sum() + np.linalg.norm(s_prime, axis=1).sum()
    return float(0.5 * np.sum((f - np.asarray(y)) ** 2) + beta * reg)


def _check_y(X, y):
    y = np.asarray(y, np.float64)
    if y.ndim != 1 or y.shape[0] != np.shape(X)[0]:
        raise ValueError(f"y must be (n,) = ({np.shape(X)[0]},), got {y.shape}")
    return y


def solve_convex_bn(X, y, beta, arrangements=None, solver: str = "CLARABEL") -> ConvexBN:
    """Solve the convex program of a BN two-layer ReLU network (Ergen et al. 2021; see the module
    docstring):

        min 1/2 ||sum_i D_i U' (s_i - s_i') - y||^2 + beta sum_i (||s_i||_2 + ||s_i'||_2)
        s.t. (2 D_i - I) U' s_i >= 0,  (2 D_i - I) U' s_i' >= 0,

    U' = [1/sqrt(n), U] from P X = U S V^T. X: (n, d), y: (n,), beta > 0. `arrangements`: a
    (P, n) bool array of patterns (from `arrangements(U')`; another X with the same U, such as
    `whiten(X)`, has the same ones); None enumerates them exactly (ValueError where that is too
    large: pass sampled ones, which give an upper bound on p*). solver: a cvxpy solver name;
    if it fails (error or a status other than optimal), SCS is tried before giving up
    (RuntimeError). Returns `ConvexBN` with value recomputed in float64 from the solution.
    """
    import cvxpy as cp  # optional dependency: dynamics[convex]

    y = _check_y(X, y)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    svd = centred_svd(X)
    Up = svd.Up
    n, k = Up.shape
    patterns = _enumerate(Up) if arrangements is None else arrangements
    patterns = np.asarray(patterns, bool)
    if patterns.ndim != 2 or patterns.shape[1] != n:
        raise ValueError(f"arrangements must be (P, n) = (P, {n}) bool, got {patterns.shape}")
    Dm = patterns.T.astype(np.float64)  # (n, P)
    sign = 2.0 * Dm - 1.0
    S1 = cp.Variable((patterns.shape[0], k))
    S2 = cp.Variable((patterns.shape[0], k))
    A1, A2 = Up @ S1.T, Up @ S2.T  # (n, P): column i is U' s_i
    f = cp.sum(cp.multiply(Dm, A1 - A2), axis=1)
    obj = 0.5 * cp.sum_squares(f - y) + beta * (
        cp.sum(cp.norm(S1, 2, axis=1)) + cp.sum(cp.norm(S2, 2, axis=1))
    )
    problem = cp.Problem(cp.Minimize(obj), [cp.multiply(sign, A1) >= 0, cp.multiply(sign, A2) >= 0])
    tried = []
    for name in dict.fromkeys([solver.upper(), "SCS"]):
        opts = {"eps": 1e-9, "max_iters": 200_000} if name == "SCS" else {}
        try:
            problem.solve(solver=name, **opts)
        except cp.error.SolverError as e:
            tried.append(f"{name}: {e}")
            continue
        if problem.status == cp.OPTIMAL and S1.value is not None:
            s, sp = np.asarray(S1.value), np.asarray(S2.value)
            value = convex_objective(s, sp, patterns, Up, y, beta)
            return ConvexBN(value, s, sp, patterns, svd, name)
        tried.append(f"{name}: status {problem.status}")
    raise RuntimeError("convex BN program not solved: " + "; ".join(tried))


def closed_form_bn(X, y, beta) -> ConvexBN:
    """The optimum in the high-dimensional regime, rank(P X) = n - 1 (generic data with
    d >= n - 1), where U' = [1/sqrt(n), U] is square and orthogonal:

        p* = 1/2 [min(||y_+||, beta)^2 + min(||y_-||, beta)^2]
             + beta [(||y_+|| - beta)_+ + (||y_-|| - beta)_+],   y_+ = max(y, 0), y_- = max(-y, 0).

    Derivation. With U' orthogonal, h_j = U' z_j ranges over all of R^n with ||h_j|| = ||z_j||,
    so the component of y along 1 is no different from any other (the 1/sqrt(n) column supplies
    it: the formula holds for uncentred y). By AM-GM, beta/2 (||z||^2 + v^2) >= beta ||z|| |v|
    with equality after rescaling, so the problem is min 1/2 ||p - q - y||^2 + beta (sum over
    neurons of ||relu(h_j)|| |v_j|) with p = sum_{v_j > 0} relu(h_j) v_j >= 0 and q likewise;
    the triangle inequality makes one neuron per sign optimal (cost beta (||p|| + ||q||)).
    Shrinking p and q where both are positive lowers both terms, so their supports are
    disjoint, and putting p where y <= 0 only adds error, so p lives on y > 0 and q on y < 0.
    The problem splits into min_{p >= 0} 1/2 ||p - y_+||^2 + beta ||p||, solved by the group
    soft threshold p = (1 - beta / ||y_+||)_+ y_+ (nonnegative, so the constraint is inactive),
    of value beta ||y_+|| - beta^2 / 2 if ||y_+|| > beta and ||y_+||^2 / 2 otherwise; the same for
    y_-. This is the formula above, which REPRODUCTIONS.md gives from the dual; the tests check
    it against the solver over all 2^n arrangements.

    The returned `ConvexBN` holds the optimal solution (patterns 1[y > 0] and 1[y < 0],
    s = U'^T p, s' = U'^T q), which `network_from_convex` turns into a two-neuron network.
    X: (n, d), y: (n,), beta > 0. Raises ValueError unless rank(P X) = n - 1.
    """
    y = _check_y(X, y)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    svd = centred_svd(X)
    n = y.shape[0]
    if svd.U.shape[1] != n - 1:
        raise ValueError(f"closed_form_bn needs rank(P X) = n - 1 = {n - 1}, got {svd.U.shape[1]}")
    Up = svd.Up
    yp, ym = np.maximum(y, 0.0), np.maximum(-y, 0.0)
    rows_s, rows_sp, pats = [], [], []
    for part, rows in ((yp, rows_s), (ym, rows_sp)):
        nrm = np.linalg.norm(part)
        if nrm > beta:
            rows.append(Up.T @ ((1.0 - beta / nrm) * part))
            (rows_sp if rows is rows_s else rows_s).append(np.zeros(n))
            pats.append(part > 0)
    P = len(pats)
    s = np.array(rows_s).reshape(P, n)
    sp = np.array(rows_sp).reshape(P, n)
    patterns = np.array(pats, bool).reshape(P, n)
    value = 0.0
    for part in (yp, ym):
        a = np.linalg.norm(part)
        value += 0.5 * min(a, beta) ** 2 + beta * max(a - beta, 0.0)
    return ConvexBN(float(value), s, sp, patterns, svd, "closed_form")


# --------------------------------------------------------------------------- back to weights


def network_from_convex(solution: ConvexBN, m: int | None = None, rtol: float = 1e-7) -> Params:
    """BN-network weights achieving the convex program's value (the paper's reconstruction).

    Each nonzero s_i (||s_i|| > rtol max ||s||) becomes one neuron with z = s_i / sqrt(||s_i||),
    v = +sqrt(||s_i||), and each s_i' one with v = -sqrt(||s_i'||): the feasibility
    (2 D_i - I) U' s_i >= 0 makes relu(U' s_i) = D_i U' s_i, and the penalty beta/2 (||z||^2 +
    v^2) = beta ||s_i||. From z = (z_0, z_1:) in the basis U' = [1/sqrt(n), U]: alpha = z_0,
    gamma = ||z_1:||, w = V S^{-1} z_1: / gamma, so that P X w / ||P X w|| = U z_1: / gamma
    (w = V S^{-1} e_1 when gamma = 0). Unused neurons up to m have gamma = alpha = v = 0.
    m: width (None: as many as needed, at least 1; ValueError if smaller). Returns params for
    `bn_apply` on the X the solution was computed from (float64 numpy arrays as jnp arrays).
    """
    svd = solution.svd
    rows = []
    s_all = np.concatenate([solution.s, solution.s_prime])
    signs = np.concatenate([np.ones(len(solution.s)), -np.ones(len(solution.s_prime))])
    norms = np.linalg.norm(s_all, axis=1)
    keep = norms > rtol * max(norms.max(initial=0.0), 1e-300)
    for si, sign, nrm in zip(s_all[keep], signs[keep], norms[keep], strict=True):
        z = si / math.sqrt(nrm)
        rows.append((z, sign * math.sqrt(nrm)))
    need = len(rows)
    m = max(need, 1) if m is None else int(m)  # a zero solution is one silent neuron
    if m < need or m < 1:
        raise ValueError(f"m must be >= {max(need, 1)} (nonzero neurons of the solution), got {m}")
    d = svd.V.shape[0]
    W = np.zeros((m, d))
    gamma, alpha, v = np.zeros(m), np.zeros(m), np.zeros(m)
    W[:] = svd.V[:, 0] / svd.S[0]
    for j, (z, vj) in enumerate(rows):
        g = np.linalg.norm(z[1:])
        alpha[j], v[j], gamma[j] = z[0], vj, g
        if g > 0:
            W[j] = svd.V @ (z[1:] / svd.S) / g
    return [
        {"w": jnp.asarray(W), "gamma": jnp.asarray(gamma), "alpha": jnp.asarray(alpha)},
        {"w": jnp.asarray(v[None, :])},
    ]
