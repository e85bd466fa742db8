"""P5 (a) of REPRODUCTIONS.md: denoising by early stopping. A deep decoder fitted to a noisy
image first fits the image, then the noise: its PSNR to the clean image over iterations is
U-shaped (Heckel & Hand, ICLR 2019, denoising.ipynb of reinhardh/supplement_deep_decoder;
Heckel & Soltanolkotabi, ICLR 2020, Fig 1).

The authors' protocol (docs/protocols/P5.md, sections 1-4):
- network and input: `decodernw(C, [k] * n_up)` as in `image_prior_fit`;
- noise: sigma / 255 Gaussian, independent per pixel and channel, then clipped to [0, 1]
  (`np.random.normal`, `np.clip`);
- loss: MSE to the noisy image; Adam, lr 0.01; recorded: the MSE and PSNR to the clean image
  (`mse_wrt_truth`; PSNR = 10 log10(1/MSE), peak 1: include/helpers.py:116-121) at every record,
  so the best iteration and the U shape come from one run (they keep the best net by training
  loss, `find_best`; we record the whole curve instead).
Theirs: astronaut 512x512 RGB, sigma 30, k = 128, 5 upsamplings from 16x16, 1900 iterations:
PSNR 28.78 dB (MSE 0.001325 at iteration 1890) from a noisy 19.07 dB.
What moved (CPU scale): a 64x64 grayscale "china" (scikit-learn), sigma in {25, 50}, k = 64,
4 upsamplings from 4x4, 1500 steps, 2 seeds (initialization; the noise and the input come from
`data_seed`). `--set scale=paper`: their sizes, k, sigma 30 and 1900 iterations, in color.
"""

import dynamics as dyn
from dynamics import priors
from sweeps import Sweep
from sweeps.configs.image_prior_fit import decoder_input


def noisy_image(image, size, sigma, color, data_seed):
    """(noisy, clean): clean in [0, 1], (1, H, W) or (3, H, W); noisy = clip(clean + sigma/255 z)."""
    clean = dyn.data.sample_image(image, size, grayscale=not color)
    clean = clean if color else clean[None]
    return priors.add_noise(clean, sigma / 255.0, data_seed), clean


def build(steps, record_every, sigma, channels, n_up, size, image, color, data_seed, gamma_init):
    noisy, clean = noisy_image(image, size, sigma, color, data_seed)
    x = decoder_input(channels, size, n_up, data_seed)
    model = priors.deep_decoder(
        channels,
        size // 2**n_up,
        priors.doubling_sizes(size // 2**n_up, n_up),
        out_channels=clean.shape[0],
        gamma_init=gamma_init,
    )
    return dyn.RunSpec(
        model=model,
        data=priors.prior_data(x, noisy, clean, name=f"{image}-sigma{sigma:g}"),
        loss="square",
        stepper=dyn.adam,
        steps=steps,
        record_every=record_every,
        observables=("loss", *priors.clean_observables(), priors.target_observable()),
        sampling="full",
    )


SWEEP = Sweep(
    name="image_prior_denoise",
    description="Heckel & Hand 2019: denoising by early stopping, U-shaped PSNR to the clean image",
    build=build,
    settings=dict(
        steps=1500,
        record_every=10,
        sigma=25.0,
        channels=64,
        n_up=4,
        size=64,
        image="china",
        color=False,
        data_seed=0,
        gamma_init="one",
    ),
    grid=dict(seed=[0, 1], lr=[0.01]),
    static=dict(sigma=[25.0, 50.0]),
    scales=dict(
        paper=dict(
            size=512,
            n_up=5,
            channels=128,
            color=True,
            sigma=[30.0],
            steps=1900,
            record_every=10,
            seed=[0, 1, 2],
        )
    ),
)
