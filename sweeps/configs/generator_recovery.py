"""P5 (c) of REPRODUCTIONS.md: the two-layer convolutional generator G(C) = relu(U C) v recovers
from m Gaussian measurements a signal in the span of its Jacobian's leading singular vectors
(low frequencies, for a circulant U), and not a high-frequency signal of the same norm
(Heckel & Soltanolkotabi, ICLR 2020, section 3, and ICML 2020).

Protocol. The authors' code has no recovery experiment for this generator (only its dual kernel,
kernels_and_associated_dual_kernels.ipynb, and an identity-U landscape plot:
docs/protocols/P5.md section 4), so the setup follows the papers' model:
- U = circulant of the authors' Gaussian kernel exp(-p^2 / (s^2 n^2)) normalized to unit norm
  (their notebook's kernel, s = 0.05); v = +-1/sqrt(k) (their visualization notebook); C (n, k)
  trained from C_ij ~ N(0, omega^2) (`priors.two_layer_generator`);
- signals: random unit-norm combinations of the Fourier frequencies 0..3 ("low") or 5n/16 ..
  5n/16 + 3 ("high"; 40..43 at n = 128) (`priors.fourier_signal`);
- y = A x with A (m, n) of N(0, 1/m) entries (the cs repo's scaling); loss mean_m (A G(C) - y)^2;
  full-batch gradient descent (the papers' analysis), lr 1, constant;
- recorded: the relative error ||G(C) - x|| / ||x|| to the signal, which the run never trains on.
CPU scale: n = 128, k = 128, m in {16, 32, 64, 128}, 2000 steps, 3 seeds (initialization; the
signal and A come from `data_seed`). `--set scale=paper`: n = 512, k = 512.
"""

import numpy as np

import dynamics as dyn
from dynamics import kernels, priors
from sweeps import Sweep

SIGNALS = ("low", "high")


def generator_U(n, kernel_sigma):
    """The fixed convolution: circulant of the authors' normalized Gaussian kernel."""
    return kernels.circulant(priors.gaussian_kernel(n, kernel_sigma))


def signal(name, n, data_seed):
    """A unit-norm signal of frequencies 0..3 ("low") or 5n/16..5n/16+3 ("high")."""
    if name not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {name!r}")
    f0 = 0 if name == "low" else 5 * n // 16
    return priors.fourier_signal(n, range(f0, f0 + 4), data_seed)


def build(steps, record_every, signal_name, m, n, k, kernel_sigma, omega, data_seed):
    if not 1 <= m <= n:
        raise ValueError(f"m: must lie in 1..n = {n}, got {m}")
    x = signal(signal_name, n, data_seed)
    A = priors.gaussian_operator(m, n, data_seed)
    y = (A.astype(np.float64) @ x).astype(np.float32)
    model = priors.two_layer_generator(generator_U(n, kernel_sigma), k, omega=omega)
    return dyn.RunSpec(
        model=model,
        data=priors.prior_data(np.zeros((1, 1), np.float32), y, x, name=f"{signal_name}-m{m}"),
        loss=dyn.losses.measurement_loss(A),
        stepper=dyn.gd,
        steps=steps,
        record_every=record_every,
        observables=("loss", *priors.clean_observables()),
        sampling="full",
    )


SWEEP = Sweep(
    name="generator_recovery",
    description="Heckel & Soltanolkotabi 2020: a two-layer generator recovers low, not high, frequencies",
    build=build,
    settings=dict(
        steps=2000,
        record_every=50,
        signal_name="low",
        m=32,
        n=128,
        k=128,
        kernel_sigma=0.05,
        omega=0.01,
        data_seed=0,
    ),
    grid=dict(seed=[0, 1, 2], lr=[1.0]),
    static=dict(signal_name=list(SIGNALS), m=[16, 32, 64, 128]),
    scales=dict(paper=dict(n=512, k=512, m=[32, 64, 128, 256, 512], steps=5000, record_every=100)),
)
