"""P10 of REPRODUCTIONS.md: Gram-matrix stability (Du, Lee, Li, Wang, Zhai, "Gradient descent
finds global minima of deep neural networks", ICML 2019, arXiv 1811.03804; sections as in the
arXiv version; the authors published no code and no experiments).

The paper's setup and claims:
- Loss (section 3): L(theta) = (1/2) sum_i (y_i - u(x_i))^2, a sum over the n training points,
  not a mean (here `half_sum_square`; the library's "square" is the mean).
- Data (section 3 and its assumption on the inputs): ||x_i||_2 = 1, |y_i| = O(1); lambda_0 > 0
  holds when no two x_i are parallel and sigma is analytic and not a polynomial (their appendix).
- Network (section 3, fully connected): x^(h) = sqrt(c_sigma / m) sigma(W^(h) x^(h-1)),
  h = 1..H, u(x) = a^T x^(H), c_sigma = 1 / E_{z ~ N(0,1)}[sigma(z)^2], every entry of W^(h)
  and a drawn from N(0, 1); sigma smooth and Lipschitz (softplus qualifies; ReLU does not):
  `kernels.du_mlp`.
- Technique (section 4): u(k+1) - u(k) ~ -eta G(k) (u(k) - y) with G(k) the sum of the
  per-layer Gram matrices; each is PSD, so lambda_min(G(k)) >= lambda_min(G^(H)(k)), G^(H) the
  Gram matrix of the last hidden layer's weights W^(H). If ||G^(H)(0) - K^(H)||_2 <= lambda_0/4
  and ||G^(H)(k) - G^(H)(0)||_2 <= lambda_0/4 for all k, then lambda_min(G^(H)(k)) >= lambda_0/2
  and the loss falls linearly; the weights stay close to their initialization.
- Fully connected theorem (section 5): K^(H) the limit of G^(H) by the recursion of their
  definition (`kernels.limit_ntk`), lambda_0 = lambda_min(K^(H)); for m = Omega(2^{O(H)}
  poly(n, 1/lambda_0, ...)) and eta = O(lambda_0 / (n^2 2^{O(H)})), with high probability
  ||y - u(k)||^2 <= (1 - eta lambda_0 / 2)^k ||y - u(0)||^2 (`kernels.linear_rate_bound`).
  Section 6: ResNets need a width polynomial in H (not swept here).

Here (CPU scale, REPRODUCTIONS.md):
- Data (`dataset`): n = 20 points of the unit sphere in R^5 drawn uniformly (seed 0), then
  spread apart by projected gradient descent on sum_{i != j} <x_i, x_j>^8 (max |cos| 0.57,
  against 0.96 for the raw draw; lambda_0 3x larger), labels y_i = +-1 random signs.
  lambda_0 = lambda_min(K^(3)) = 1.92e-4 in float64 quadrature: softplus is so smooth that the
  depth-3 kernel on 20 points in R^5 is nearly singular.
- Model: `du_mlp(5, m, 3, activation="softplus")`, widths m in {64, 256, 1024, 4096} (static
  axis), 4 seeds (the network's initialization). All H + 1 layers, a included, are trained
  (the proof needs only G^(H), so it covers either choice).
- Training: full-batch GD (`dyn.sgd`, sampling="full") on `half_sum_square`, 100 steps.
  Step size: eta = 0.03. The theorem's eta = O(lambda_0 / n^2), about 5e-7 up to constants,
  would not move the network in any affordable number of steps; 0.03 is the largest round step
  with eta lambda_max(G(0)) <= ~1 at every width (the full NTK's lambda_max is 23-36, set by the
  output layer's Gram), so GD contracts every eigendirection monotonically. In terms of
  lambda_0 the bound's factor per step is 1 - eta lambda_0 / 2 = 1 - 2.9e-6: the linear-rate
  bound falls by 3e-4 over the run, so "the loss stays below the bound" is a weak check here;
  the drift condition is the informative one.
- Recorded every 5 steps, on the 20 training points (`kernels.ntk_gram_observables` with the
  Jacobian-free `kernels.du_layer_grams`; G(0) from the run's initial parameters): for G^(H)
  (`gram_*`): lambda_min, ||G(t) - G(0)||_2, that over ||G(0)||_2, and ||G(t) - K^(H)||_2 /
  ||K^(H)||_2 (K^(H) in float64, passed as the reference); for the full NTK (`ntk_*`):
  lambda_min, lambda_max, the drift and relative drift; the loss; `rel_dist`, ||W_k(t) -
  W_k(0)||_F / ||W_k(0)||_F per layer.

16 runs in 4 programs (one per width; seeds vmapped): 7 min 7 s of wall time from a cold
compilation cache (compile 17.6 s, run 406 s), nearly all of it the width-4096 program (about
0.9 s per GD step per run), on the 2-core machine shared with another figure job at load ~4.5.
`--set scale=paper`: widths up to 16384, 8 seeds, 400 steps
(an accelerator job: 2 x 16384^2 weights per run).
"""

import functools

import jax.numpy as jnp
import numpy as np

import dynamics as dyn
from dynamics import kernels as kn
from dynamics import representations as rep
from sweeps import Sweep


def sphere_points(n: int, d: int, seed: int, spread_steps: int = 2000) -> np.ndarray:
    """n points on the unit sphere of R^d (float64 (n, d)): drawn uniformly, then pushed apart
    by projected gradient descent on sum_{i != j} <x_i, x_j>^8, which drives every |cos| down
    (away from parallel and antiparallel pairs alike)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for _ in range(spread_steps):
        c = x @ x.T
        np.fill_diagonal(c, 0.0)
        g = 8.0 * (c**7) @ x
        x = x - 0.01 * g / max(1.0, float(np.abs(g).max()))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def dataset(n: int, d: int, seed: int = 0) -> dyn.Dataset:
    """Du et al.'s data: x_i on the unit sphere, no two parallel; labels y_i = +-1 (|y_i| =
    O(1)), fixed random signs. No test set."""
    x = sphere_points(n, d, seed)
    y = np.where(np.random.default_rng(seed + 1).random(n) < 0.5, -1.0, 1.0)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    return dyn.Dataset(x32, y32, x32[:0], y32[:0], 0, f"sphere{n}x{d}")


def half_sum_square(pred, target, weights=None):
    """Du et al.'s loss L = (1/2) sum_i (y_i - u(x_i))^2 over the examples a batch keeps
    (weights > 0; None: all), a sum, not a mean."""
    d = pred.reshape(pred.shape[0]) - target.reshape(pred.shape[0]).astype(pred.dtype)
    keep = jnp.ones_like(d, bool) if weights is None else weights > 0
    return 0.5 * jnp.sum(jnp.where(keep, d**2, 0.0))


def build(width, n, d, depth, activation, steps, record_every):
    data = dataset(n, d)
    model = kn.du_mlp(d, width, depth, activation=activation)
    K = kn.limit_ntk(data.x_train.astype(np.float64), depth, activation)
    grams = functools.partial(kn.du_layer_grams, activation=activation)
    return dyn.RunSpec(
        model=model,
        data=data,
        loss=half_sum_square,
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        sampling="full",
        eval_size=None,
        observables=(
            "loss",
            *kn.ntk_gram_observables(
                "x_train",
                layer_grams=grams,
                wrt=(depth - 1,),
                prefix="gram",
                stats=("min_eig", "drift", "rel_drift", "ref_dev"),
                reference=K,
            ),
            *kn.ntk_gram_observables(
                "x_train",
                layer_grams=grams,
                prefix="ntk",
                stats=("min_eig", "max_eig", "drift", "rel_drift"),
            ),
            rep.relative_distance(),
        ),
    )


SWEEP = Sweep(
    name="gram_stability",
    description="Du et al. 2019: deep softplus net in their parameterization, full-batch GD on 20 points of the unit sphere in R^5; Gram matrix G^(H) against the limit kernel, its drift, the linear rate bound, weight movement vs width",
    build=build,
    settings=dict(width=64, n=20, d=5, depth=3, activation="softplus", steps=100, record_every=5),
    grid=dict(seed=[0, 1, 2, 3], lr=[0.03]),
    static=dict(width=[64, 256, 1024, 4096]),
    keep_params=False,
    scales=dict(
        paper=dict(
            width=[64, 256, 1024, 4096, 16384], seed=list(range(8)), steps=400, record_every=10
        )
    ),
)
