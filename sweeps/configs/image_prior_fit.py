"""P5 (a) of REPRODUCTIONS.md: a deep decoder fits a natural image much faster than noise of the
same norm (Heckel & Soltanolkotabi, ICLR 2020, Fig 1: denoising_MSE_curves.ipynb of
MLI-lab/overparameterized_convolutional_generators).

The authors' protocol (file citations in docs/protocols/P5.md, sections 1-2, 4):
- network: `decodernw(1, [k] * n_up)` (include/decoder.py:23-72): n_up + 1 blocks of 1x1 conv
  (no bias) -> bilinear x2 upsampling (align_corners=False; not in the last block) -> ReLU ->
  BatchNorm2d (affine, train mode over one image), then a 1x1 conv (no bias) and a sigmoid;
  PyTorch's default init (`dynamics.priors.deep_decoder`);
- input: fixed uniform [0, 0.1) noise of k channels at size / 2^n_up (include/fit.py);
- targets: the image, or uniform [0, 1) noise rescaled to the image's L2 norm (the notebook's
  `np.random.rand` noise);
- loss: MSE (mean over pixels); Adam (optax, b1 0.9, b2 0.999, eps 1e-8), lr 0.01, constant.
What moved (CPU scale): the image is a 64x64 grayscale resize of the central square of
scikit-learn's "china" photograph (theirs: the 256x256 phantom), k in {32, 64} (theirs 256),
4 upsamplings from 4x4 (theirs from 16x16), 2000 steps (theirs 10^4), 2 seeds (theirs 1). The seed
draws the network's initialization; the input and the noise come from `data_seed`. The paper
scale (`--set scale=paper`) has their k, sizes and length on a 256x256 photograph.
Not the authors' order in this figure: the notebook's image and noise fits (its cells 21 and 23)
build the decoder with the block that keeps the size first (blocks at sizes 16...256); the order
above, with that block last, is the one of its noisy-image fit (cell 25) and of the supplement's
denoising (docs/protocols/P5.md, Differences).
"""

import dynamics as dyn
from dynamics import priors
from sweeps import Sweep

TARGETS = ("image", "noise")


def target_image(target, image, size, data_seed):
    """(target, clean reference) of one fit: the image, or norm-matched uniform noise."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    img = dyn.data.sample_image(image, size)[None]
    if target == "image":
        return img, img
    noise = priors.uniform_noise_like(img, data_seed)
    return noise, noise


def decoder_input(channels, size, n_up, data_seed):
    """The fixed input, uniform [0, 0.1), at size / 2^n_up (the authors' `fit`)."""
    if size % 2**n_up:
        raise ValueError(f"size: {size} is not divisible by 2^n_up = {2**n_up}")
    return priors.fixed_input(channels, size // 2**n_up, data_seed)


def build(steps, record_every, target, channels, n_up, size, image, data_seed, gamma_init):
    y, ref = target_image(target, image, size, data_seed)
    x = decoder_input(channels, size, n_up, data_seed)
    model = priors.deep_decoder(
        channels,
        size // 2**n_up,
        priors.doubling_sizes(size // 2**n_up, n_up),
        gamma_init=gamma_init,
    )
    return dyn.RunSpec(
        model=model,
        data=priors.prior_data(x, y, ref, name=f"{image}-{target}"),
        loss="square",
        stepper=dyn.adam,
        steps=steps,
        record_every=record_every,
        observables=("loss",),
        sampling="full",
    )


SWEEP = Sweep(
    name="image_prior_fit",
    description="Heckel & Soltanolkotabi 2020 Fig 1: a deep decoder fits an image faster than noise",
    build=build,
    settings=dict(
        steps=2000,
        record_every=20,
        target="image",
        channels=64,
        n_up=4,
        size=64,
        image="china",
        data_seed=0,
        gamma_init="one",
    ),
    grid=dict(seed=[0, 1], lr=[0.01]),
    static=dict(target=list(TARGETS), channels=[32, 64]),
    scales=dict(paper=dict(size=256, channels=[256], steps=10000, record_every=50, seed=[0, 1, 2])),
)
