"""P5 (b) of REPRODUCTIONS.md: compressive sensing with an un-trained deep decoder. Fitted to
m < n measurements, the over-parameterized decoder drives the training loss to about zero while
its image stays close to the true one, far better than the least-norm solution A^+ y
(Heckel & Soltanolkotabi, ICML 2020; compressive_sensing_example_convergence.ipynb of
MLI-lab/cs_deep_decoder).

The authors' protocol (docs/protocols/P5.md, sections 1-4):
- network: the cs repo's `deepdecoder(in_size, out_size, 1, [k] * depth)` (include/decoder.py:
  24-80): `depth` blocks of 1x1 conv (no bias) -> bilinear resize (align_corners=False) to the
  geometric sizes ceil(scale^n in) -> ReLU -> BatchNorm (affine, one image), then a 1x1 conv and a
  sigmoid (`priors.geometric_sizes`, `priors.deep_decoder`); input uniform [0, 0.1) at in_size;
- measurements: a random pixel mask keeping each pixel with probability p (theirs 1/3:
  `randint(3) < 1`), loss `mse(out * mask, img * mask)`, the mean over all n pixels
  (`priors.mask_loss`); or Gaussian A with N(0, 1/m) entries (theirs m = n/4), loss the mean
  over the m measurements (`dynamics.losses.measurement_loss`);
- Adam, lr 0.005, constant; the final network is used (no find_best). Theirs: 256x256 grayscale
  art.jpeg (divided by its max), 16 -> 256 in 5 blocks of 256 channels, 10^5 iterations, the
  mask run printed: training loss 0.000000, PSNR 27.47 dB.
Baseline: `baseline_psnr(settings)`, the PSNR of A^+ y (`kernels.least_norm_solution`; for a
mask it is the masked image, zeros elsewhere), computed on the host by the figure and the tests.
What moved (CPU scale): a 64x64 grayscale "china" (scikit-learn) divided by its max, 4 -> 64 in 4
blocks of 64 channels (sizes 8, 16, 32, 64, so every block doubles), 3000 steps, fractions
m/n in {1/8, 1/4, 1/3, 1/2} for both operators, 1 seed (initialization; the mask, A and the
input come from `data_seed`). `--set scale=paper`: their sizes, k, length and the mask at 1/3
(a dense Gaussian A at n = 65536 would be a 4 GiB constant: refused).
"""

import numpy as np

import dynamics as dyn
from dynamics import priors
from sweeps import Sweep

OPERATORS = ("mask", "gaussian")
MAX_OPERATOR_ENTRIES = 1 << 28  # a dense A is closed over by the loss: 1 GiB of float32 at most


def measurements(operator, fraction, image, size, data_seed, baseline=False):
    """(target, loss, clean) for one operator at m/n = fraction; with baseline=True also the
    PSNR of the least-norm solution A^+ y (float64, on the host)."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    img = dyn.data.sample_image(image, size)
    clean = (img / img.max())[None].astype(np.float32)  # the notebook divides by the max
    n = clean.size
    if operator == "mask":
        M = priors.pixel_mask(clean.shape, fraction, data_seed)
        y = M * clean
        # A^+ y of the row selection is y on the kept pixels and 0 elsewhere: y itself
        out = (y, priors.mask_loss(M), clean)
        return out + (float(priors.psnr(y, clean)),) if baseline else out
    m = max(1, int(fraction * n))
    if m * n > MAX_OPERATOR_ENTRIES:
        raise ValueError(
            f"operator: a dense Gaussian A of {m} x {n} entries is too large to close over "
            f"(at most {MAX_OPERATOR_ENTRIES}); use operator=mask"
        )
    A = priors.gaussian_operator(m, n, data_seed)
    y = (A.astype(np.float64) @ clean.ravel()).astype(np.float32)
    out = (y, dyn.losses.measurement_loss(A), clean)
    return out + (priors.least_norm_psnr(A, y, clean),) if baseline else out


def baseline_psnr(settings):
    """PSNR of A^+ y for the stored settings of one static point (the figure's baseline)."""
    s = settings
    return measurements(s["operator"], s["fraction"], s["image"], s["size"], s["data_seed"], True)[
        3
    ]


def build(
    steps, record_every, operator, fraction, channels, depth, in_size, size, image, data_seed
):
    y, loss, clean = measurements(operator, fraction, image, size, data_seed)
    x = priors.fixed_input(channels, in_size, data_seed)
    model = priors.deep_decoder(channels, in_size, priors.geometric_sizes(in_size, size, depth))
    return dyn.RunSpec(
        model=model,
        data=priors.prior_data(x, y, clean, name=f"{image}-{operator}-{fraction:g}"),
        loss=loss,
        stepper=dyn.adam,
        steps=steps,
        record_every=record_every,
        observables=("loss", *priors.clean_observables()),
        sampling="full",
    )


SWEEP = Sweep(
    name="image_prior_cs",
    description="Heckel & Soltanolkotabi 2020: compressive sensing with an un-trained decoder vs A^+ y",
    build=build,
    settings=dict(
        steps=3000,
        record_every=30,
        operator="mask",
        fraction=1 / 3,
        channels=64,
        depth=4,
        in_size=4,
        size=64,
        image="china",
        data_seed=0,
    ),
    grid=dict(seed=[0], lr=[0.005]),
    static=dict(operator=list(OPERATORS), fraction=[0.125, 0.25, 1 / 3, 0.5]),
    scales=dict(
        paper=dict(
            operator=["mask"],
            fraction=[1 / 3],
            channels=256,
            depth=5,
            in_size=16,
            size=256,
            steps=100000,
            record_every=500,
            seed=[0, 1],
        )
    ),
)
