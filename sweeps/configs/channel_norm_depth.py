"""P4 (a) of REPRODUCTIONS.md: deep single-channel linear 1-D conv nets fitting one step, with
and without channel normalization (Dai & Heckel, arXiv 1907.09539, section 4), under the
authors' protocol at the authors' sizes (MLI-lab/channel_normalization, snapshot c26d1e1; file
citations in docs/protocols/P4.md, sections 1-4).

The authors' protocol, each fact from their code:
- network (`decnet(1, [1]*L, 15, act_fun=None, mode, res=False)`, include/onedim.py:174-207):
  L blocks x_k = N(w_k * x_{k-1}), * a circular convolution of 15 taps without bias
  (`conv`, include/onedim.py:73-87; circular padding of 7 per side, `pad_circular1d`,
  include/onedim.py:22-25), then y = sigmoid(w_o x_L + b_o), a 1x1 conv with bias
  (include/onedim.py:204-205). Ours: `dyn.linear_conv1d(L, kernel=15, channels=1,
  padding="circular", head="sigmoid", head_bias=True)`.
- N (`ChannelNormalization`, include/onedim.py:102-144): mode "BN", the paper's channel norm,
  (x - mean) / sqrt(var_unbiased + 1e-5) + b with a learned bias b (init 0) and no gain
  (norm="channel", channel_form="var_unbiased", norm_bias=True); the baseline, mode
  "only+bias", is x + b (norm="bias"), so both nets have the same parameters.
- init: PyTorch's default Conv1d init, U(+-1/sqrt(fan_in)) for weights and the head bias
  (fan_in = C_in k), beta 0 (include/onedim.py:84, 109-110; init="pytorch").
- data (`fit`, include/onedim.py:220-227, and the notebook's cell 11): input uniform [0, 1)
  noise of shape (1, 1, 128), fixed during training; target the step, 1 on the first 64
  samples and 0 on the last 64.
- loss: torch.nn.MSELoss, the mean over the 128 outputs (loss="square"); optimizer:
  torch.optim.SGD(lr=0.1, momentum=0.9) on every parameter, no weight decay, no schedule
  (include/onedim.py:237-239): heavy-ball momentum v <- 0.9 v + g, w <- w - 0.1 v.
- observable: ||dL/dW||_2 of every weight with 3 axes (the L convs and the head's 1x1 conv;
  biases excluded) at iteration 0 (include/onedim.py:259-260; the notebook prints
  `out_grads[:, 0]`): `grad_init` below, whose record 1 is the gradient at initialization
  (layer L is the head), and the loss every `record_every` iterations.
- sizes: depths 5, 10 and 30 (one_dim_net_convergence_paper.ipynb, cells 13-19); they trained
  1000-5000 iterations (3000 for channel norm at L=30); here every run takes 3000.
What moved: nothing of the network, data or optimizer. The authors ran one unseeded run per
depth and mode, each with a fresh input and initialization; we run 32 seeds, each drawing its
own initialization and its own input (`fresh_input`, from the run's key through
`RunSpec.data_transform`; `--set fresh_input=false` shares the one draw of `input_seed`).
`--set scale=paper` adds depths 2, 15 and 20 and takes 128 seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dyn
from sweeps import Sweep


def step_data(n, channels, input_seed):
    """The authors' single example: x ~ U[0, 1) of shape (1, channels, n), y the step of shape
    (1, 1, n), 1 on the first n/2 samples and 0 on the rest (include/onedim.py:224-227 and
    the notebook's cells 3 and 11)."""
    x = np.random.default_rng(input_seed).uniform(size=(1, channels, n)).astype(np.float32)
    y = dyn.data.step_signal(n, low=1.0, high=0.0)[None, None]
    return dyn.data.Dataset(x, y, x[:0], y[:0], 0, f"step-{n}")


def fresh_uniform_input(key, data, hp):
    """The authors draw a new input for every run: x ~ U[0, 1) of the input's shape from the
    run's own key (`RunSpec.data_transform`); the target stays the step."""
    x = jax.random.uniform(key, data.x_train.shape, data.x_train.dtype)
    return data._replace(x_train=x, x_eval=x[: data.x_eval.shape[0]])


def grad_at_interval_start(record_every):
    """||dL/dW_k||_2 per layer (weights only: biases and norm parameters excluded) of the
    gradient taken by the FIRST step of each record interval, steps (k-1) r + 1 of record k
    with r = record_every: record 1 holds the gradient at initialization, the authors'
    `out_grads[:, 0]` (include/onedim.py:259-260). The built-in `grad_norm_weight` keeps the
    interval's last step instead, which is the gradient at init only with record_every=1."""

    def fn(ctx):
        return jnp.sqrt(dyn.recording.weight_sq_norms(ctx.grads))

    return dyn.Observable(
        "grad_init",
        fn,
        dims=("layer",),
        kind="step",
        reduce="first",
        doc="||dL/dW_k|| of the first step of the record interval (record 1: at init)",
        layerwise=True,  # one entry per layer: depths share one program (depth_strategy)
    )


def build(steps, record_every, depth, norm, n, kernel, input_seed, fresh_input=True):
    model = dyn.linear_conv1d(
        depth,
        kernel=kernel,
        channels=1,
        padding="circular",
        norm=norm,
        channel_form="var_unbiased",
        norm_bias=True,
        head="sigmoid",
        head_bias=True,
        eps=1e-5,
        init="pytorch",
    )
    return dyn.RunSpec(
        model=model,
        data=step_data(n, 1, input_seed),
        loss="square",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        steps=steps,
        record_every=record_every,
        observables=("loss", grad_at_interval_start(record_every)),
        sampling="full",
        data_transform=fresh_uniform_input if fresh_input else None,
    )


SWEEP = Sweep(
    name="channel_norm_depth",
    description="Dai & Heckel 2019: deep linear 1-D conv nets, depth x (channel norm | bias only); "
    "gradients at init, loss",
    build=build,
    settings=dict(
        steps=3000,
        record_every=10,
        depth=5,
        norm="bias",
        n=128,
        kernel=15,
        input_seed=0,
        fresh_input=True,
    ),
    grid=dict(seed=list(range(32)), lr=[0.1], momentum=[0.9]),
    static=dict(depth=[5, 10, 30], norm=["bias", "channel"]),
    scales=dict(paper=dict(depth=[2, 5, 10, 15, 20, 30], seed=list(range(128)))),
    keep_params=False,  # the figure reads records only
)
