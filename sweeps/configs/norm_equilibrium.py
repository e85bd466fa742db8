"""P2, the Lagrange-multiplier form and its equilibrium (Xu et al., Research 2023; Poggio & Liao,
arXiv 2101.00072). Not in the authors' code (protocol_P2.md section 8: their repository has
no Lagrange implementation; `compnorm periter` is a projection of another kind), so this
sweep is the theory's setting on the authors' data, net and loss:

- Data, loss, batches: as `norm_dynamics` (digits 1 vs 2 standardized then unit L2, two one-hot
  outputs, L = mean over the batch and the 2 outputs of (f - y)^2, batch 128 of shuffled
  epochs with the last one partial, 2000 epochs).
- Net: the authors' NetSimpleConv4 (`norm_dynamics.authors_net`) without BN and without biases,
  so that it is homogeneous: every layer W_k = rho_k V_k with ||V_k||_F = 1 and
  f(x) = rho f_V(x), rho = prod_k rho_k (biases or BN would break f = rho f_V). rho_k = s (the
  init scale) at initialization, V_k the authors' normalized Gaussian.
- Dynamics: `dyn.normalized_gd` (projected steps of V_k on the unit sphere, weight decay
  lambda on the scales rho_k only; no momentum), lr 0.1: the authors' lr 0.01 with momentum
  0.9 takes steps of lr / (1 - 0.9) = 0.1 once the momentum has built up.

Equilibrium (`equilibrium` below): at a stationary point of E[L] + lambda/2 sum_k rho_k^2,
with S1 = sum_n <y_n, f_V(x_n)>, S2 = sum_n ||f_V(x_n)||^2 over the N training points and
C = 2 outputs, d/d rho_k = 0 for every k gives rho (S1 - rho S2) = (N C lambda / 2) rho_k^2,
hence

    rho = S1 / (S2 + lambda_eff),   lambda_eff = (N C lambda / 2) mean_k rho_k^2 / rho^2,

the paper's rho = sum_n y_n f_V(x_n) / (lambda + sum_n f_V(x_n)^2) with our loss's constants
(the mean over N C entries, the decay lambda rho_k on each of the K scales). Recorded: rho,
the right-hand side, and S1 / S2 (the same without weight decay) over the whole training set.

Grid: wd 0 and 0.01, init scales 2 and 4 (rho = 16 and 256 at init; from scale 1 with wd
0.01 one of two seeds fell to the origin rho = 0, a stationary point too), 2 seeds, width 8
as `norm_dynamics`: 8 runs, about 30 s of CPU time on 2 cores. Measured (the stored sweep):
with wd, rho from both starts ends at 9.3-9.8 and |rhs / rho - 1| averages below 1e-3 over the
last quarter of the records, while S1 / S2 misses rho by 3.4%; the formula already holds while
rho is still falling from init 4, as soon as the scales track the directions V_k.

`--set scale=paper`: CIFAR-10 classes 1 and 2 from `data_root`, width 32, 1000 epochs.
"""

import jax
import jax.numpy as jnp

import dynamics as dyn
from sweeps import Sweep
from sweeps.configs.norm_dynamics import Keyed, authors_net, binary_task, margins_on_test

OBSERVABLES = ("loss", "accuracy", "test_accuracy", "rho", "layer_norm", "margins")
EQ_TERMS = ("rho", "rhs", "rhs_no_wd")


def equilibrium(model: dyn.Model) -> dyn.Observable:
    """Observable `equilibrium` (eq_term: rho, rhs, rhs_no_wd) of a Lagrange-form homogeneous
    `model` (every layer {"v", "rho"}, no bias, no BN) on the whole training set:
        rho       = prod_k rho_k
        rhs       = S1 / (S2 + lambda_eff),  lambda_eff = (N C lambda / 2) mean_k rho_k^2 / rho^2
        rhs_no_wd = S1 / S2
    with f_V the network at rho_k = 1, S1 = sum_n <onehot(y_n), f_V(x_n)>, S2 = sum_n
    ||f_V(x_n)||^2, N the training examples, C the outputs, lambda = hp.weight_decay. At a
    stationary point of the mean square loss plus lambda/2 sum_k rho_k^2, rho = rhs."""

    def fn(ctx):
        params = ctx.params
        for p in params:
            if not (isinstance(p, dict) and "v" in p and "rho" in p) or "b" in p:
                raise ValueError("equilibrium: needs every layer in the form {'v', 'rho'}, no bias")
        rhos = jnp.stack([p["rho"] for p in params])
        rho = jnp.prod(rhos)
        unit = [{**p, "rho": jnp.ones_like(p["rho"])} for p in params]
        f_v = dyn.forward(model, unit, (), ctx.data.x_train, train=False).y
        n, c = f_v.shape
        y = jax.nn.one_hot(ctx.data.y_train, c, dtype=f_v.dtype)
        s1, s2 = jnp.sum(y * f_v), jnp.sum(f_v**2)
        lam = ctx.hp.weight_decay * n * c / 2 * jnp.mean(rhos**2) / rho**2
        return jnp.stack([rho, s1 / (s2 + lam), s1 / s2])

    return dyn.Observable(
        "equilibrium",
        Keyed("equilibrium", fn),
        dims=("eq_term",),
        doc="rho, S1/(S2 + lambda_eff), S1/S2 of the Lagrange form on the training set",
    )


def build(epochs, record_every, dataset, classes, data_root, width, batch):
    data = binary_task(dataset, tuple(classes), data_root)
    model = authors_net(data.x_train.shape[1:], width, bn=False, bias=False, lagrange=True)
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.normalized_gd,
        epochs=epochs,
        record_every=record_every,
        batch=batch,
        observables=(*OBSERVABLES, equilibrium(model), margins_on_test()),
        eval_size=None,
    )


SWEEP = Sweep(
    name="norm_equilibrium",
    description="P2 Lagrange form W_k = rho_k V_k of the authors' net (no BN, no bias): "
    "normalized GD, wd 0 / 0.01, and the check rho = S1 / (S2 + lambda_eff)",
    build=build,
    settings=dict(
        epochs=2000,
        record_every=20,
        dataset="digits",
        classes=(1, 2),
        data_root="",
        width=8,
        batch=128,
    ),
    grid=dict(seed=[0, 1], lr=[0.1], weight_decay=[0.0, 0.01], init_scale=[2.0, 4.0]),
    scales=dict(
        paper=dict(
            dataset="cifar10",
            data_root="data/cifar-10-batches-py",
            width=32,
            epochs=1000,
            record_every=10,
            seed=[0, 1, 2],
        )
    ),
)
