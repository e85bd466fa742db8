"""P5 (c) of REPRODUCTIONS.md: the Jacobian of the two-layer generator G(C) = relu(U C) v. Its
leading left singular vectors are the dual kernel's leading eigenvectors (for a circulant U:
low-frequency trigonometric functions), they move little during training, and gradient descent
fits the signal along them first (Heckel & Soltanolkotabi, ICLR 2020, Figs 6-7).

Protocol (docs/protocols/P5.md section 4):
- the generator, U and v of `generator_recovery` (the authors' Gaussian kernel, v = +-1/sqrt(k));
- target: Fig 7's noisy step, 1 on the first half and 0 on the second plus N(0, 0.2^2) noise
  (their notebook: 0.4 * N(0, 0.5^2)); square loss (mean over the n outputs), full-batch GD,
  lr 2; recorded: the relative error to the clean step, and (costly tier, every slow_every
  records) the top singular values / vectors of J = dG/dC from the closed form J J^T
  (`priors.generator_gram`), their overlap with the span of the dual kernel's top eigenvectors
  (`kernels.generator_dual_kernel`: E[J J^T] for v = +-1/sqrt(k)) and with the initial ones.
Differences: Fig 7 of the paper takes the Jacobian of a 4-layer 1-D deep decoder (n = 512, 64
channels) fitted by Adam, and its notebook accumulates gradients across the rows of J
(no zero_grad); here it is the two-layer generator the theory is about, whose J has a closed
form, fitted by GD. CPU scale: n = 128, k in {32, 128, 512}, 3000 steps, 2 seeds.
`--set scale=paper`: n = 512.
"""

import functools

import numpy as np

import dynamics as dyn
from dynamics import priors
from sweeps import Sweep
from sweeps.configs.generator_recovery import generator_U


def noisy_step(n, noise, data_seed):
    """(noisy, clean): the step 1 on the first half, 0 on the second, plus N(0, noise^2)."""
    clean = np.zeros(n)
    clean[: n // 2] = 1.0
    z = np.random.default_rng(np.random.SeedSequence([int(data_seed), 7])).standard_normal(n)
    return clean + noise * z, clean


@functools.cache
def jacobian_observables(n, kernel_sigma, top):
    """The Jacobian observables of every width (one set of objects: the gram reads k off C)."""
    U = generator_U(n, kernel_sigma)
    _, ref = priors.dual_kernel_eigvecs(U, top)
    return priors.jacobian_observables(top, priors.generator_gram(U), reference=ref)


def build(steps, record_every, slow_every, n, k, kernel_sigma, omega, top, noise, data_seed):
    U = generator_U(n, kernel_sigma)
    noisy, clean = noisy_step(n, noise, data_seed)
    model = priors.two_layer_generator(U, k, omega=omega)
    jac = jacobian_observables(n, kernel_sigma, top)
    return dyn.RunSpec(
        model=model,
        data=priors.prior_data(np.zeros((1, 1), np.float32), noisy, clean, name="noisy-step"),
        loss="square",
        stepper=dyn.gd,
        steps=steps,
        record_every=record_every,
        slow_every=slow_every,
        observables=("loss", *priors.clean_observables(), *jac),
        sampling="full",
    )


SWEEP = Sweep(
    name="generator_jacobian",
    description="Heckel & Soltanolkotabi 2020: the generator's Jacobian spectrum vs its dual kernel",
    build=build,
    settings=dict(
        steps=3000,
        record_every=25,
        slow_every=4,
        n=128,
        k=128,
        kernel_sigma=0.05,
        omega=0.01,
        top=9,
        noise=0.2,
        data_seed=0,
    ),
    grid=dict(seed=[0, 1], lr=[2.0]),
    static=dict(k=[32, 128, 512]),
    scales=dict(paper=dict(n=512, k=[64, 256, 1024], steps=5000, record_every=50)),
)
