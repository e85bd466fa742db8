"""P11 of REPRODUCTIONS.md: SGD on structured data changes few activation patterns (Li & Liang,
NeurIPS 2018, arXiv 1808.01204).

The paper's network and claims (its sections 3 and 5): a two-layer ReLU network without biases,
f_j(x) = sum_i a_ij relu(<w_i, x>), whose output weights a are fixed random signs and whose first
layer W alone is trained by minibatch SGD on the cross-entropy, on a mixture of well-separated
distributions; as the width m grows, the fraction of activation patterns 1[<w_i, x> > 0] on the
data that change during training falls, the relative change ||W_t - W_0||_F / ||W_0||_F falls,
and the accumulated update W_t - W_0 is close to low rank; the network generalizes. Their 2-D
illustration: classes as unions of small balls at (0,0),(2,2) against (0,2),(2,0).

Here (CPU scale; no public code, so what the paper leaves open is chosen and stated):
- Data (`geometry.xor_balls`): that XOR of balls shifted by (-1, -1) (a network without biases
  is constant in sign along rays, and a ball at the origin would hold every direction),
  embedded in R^20 by a random orthonormal Q (20, 2), each example Q c + u with u uniform in the
  20-dimensional ball of radius 0.5 (the data span R^20, so W_T - W_0 is not low rank by
  construction); 1000 training and 1000 test points, balanced over the four balls.
- Model (`sign_output_mlp`): `dyn.mlp((20, m, 2))` without biases, W He-Gaussian N(0, 2/20),
  a_ij = +-1/sqrt(m) fixed (random signs, not trained: `lr_scale=[1, 0]`). The paper's
  a_ij = +-1 with w ~ N(0, sigma^2 I) is the same network up to rescaling W by sqrt(m), under
  which its lr is ours divided by m: one lr serves every width here.
- Training: SGD (no momentum, no weight decay), lr 0.2, batches of 32 drawn without replacement,
  400 steps (12.8 epochs; 100% training accuracy is reached within the first 35 steps at every
  width); widths {100, 400, 1600, 6400} (static axis), 3 seeds.
- Recorded every 5 steps: training and test accuracy, `rel_dist` (||W_k - W_k(0)||_F /
  ||W_k(0)||_F per layer; the output layer's is 0), `flipped` (fraction of (training point,
  unit) activation patterns changed since initialization, on all 1000 training points), and
  `dw_sv` (singular values of W_1(t) - W_1(0)).

12 runs in 4 programs: 32 s of wall time from a cold compilation cache (compile 14 s, run 16 s)
on the 2-core machine shared with other jobs at load ~4. `--set scale=paper`: widths up to 25600 and 5 seeds.
"""

import functools

import jax
import jax.numpy as jnp

import dynamics as dyn
from dynamics import geometry as geo
from dynamics import representations as rep
from sweeps import Sweep


def sign_output_mlp(d: int, m: int, k: int) -> dyn.Model:
    """dyn.mlp((d, m, k)) without biases, its output weights re-drawn as +-1/sqrt(m) signs."""
    base = dyn.mlp((d, m, k))

    def init(key):
        k_hidden, k_out = jax.random.split(key)
        first = base.init(k_hidden)[0]
        signs = jnp.where(jax.random.bernoulli(k_out, 0.5, (k, m)), 1.0, -1.0)
        return [first, {"w": signs / jnp.sqrt(m)}]

    return base._replace(init=init)


def build(width, d, n_train, n_test, radius, steps, record_every, batch):
    data = geo.xor_balls(seed=0, n_train=n_train, n_test=n_test, d=d, radius=radius)
    model = sign_output_mlp(d, width, 2)
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="cross_entropy",
        stepper=functools.partial(dyn.sgd, lr_scale=[1.0, 0.0]),
        steps=steps,
        record_every=record_every,
        observables=(
            "accuracy",
            "test_accuracy",
            rep.relative_distance(),
            rep.flipped_patterns("x_eval", model),
            rep.update_singular_values(0),
        ),
        batch=batch,
        sampling="permutation",
        eval_size=None,
    )


SWEEP = Sweep(
    name="activation_patterns",
    description="Li & Liang 2018: two-layer ReLU net, fixed sign output, SGD on the XOR of balls in R^20; flipped activation patterns, relative change and spectrum of W_t - W_0 vs width",
    build=build,
    settings=dict(
        width=100,
        d=20,
        n_train=1000,
        n_test=1000,
        radius=0.5,
        steps=400,
        record_every=5,
        batch=32,
    ),
    grid=dict(seed=[0, 1, 2], lr=[0.2]),
    static=dict(width=[100, 400, 1600, 6400]),
    scales=dict(paper=dict(width=[100, 400, 1600, 6400, 25600], seed=list(range(5)))),
)
