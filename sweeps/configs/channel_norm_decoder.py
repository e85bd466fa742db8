"""P4 (b) of REPRODUCTIONS.md: a 12-layer, 4-channel 1-D ReLU decoder fitting a step of length
1024, with and without channel normalization (Dai & Heckel, arXiv 1907.09539), under the authors'
protocol at the authors' sizes (MLI-lab/channel_normalization, snapshot c26d1e1; the ReLU
experiment of one_dim_net_convergence_paper.ipynb, cells 3-9; file citations in
docs/protocols/P4.md, sections 1-4).

The authors' protocol, each fact from their code:
- network (`decnet(1, [4]*12, 3, act_fun=nn.ReLU(), mode, res=False)`, include/onedim.py:
  174-207): 12 blocks x_k = N(relu(w_k * x_{k-1})), * a circular convolution of 3 taps, 4 -> 4
  channels, no bias (`conv`, include/onedim.py:73-87), then y = sigmoid(w_o x_12 + b_o), a 1x1
  conv 4 -> 1 with bias (include/onedim.py:204-205). Ours: `dyn.deep_decoder(4, 12, kernel=3,
  dim=1, upsample=1, padding="circular", head_bias=True, output="sigmoid")`.
- N (`ChannelNormalization`, include/onedim.py:102-144): mode "BN", (x - mean) /
  sqrt(var_unbiased + 1e-5) + b per channel, learned bias b (init 0), no gain
  (norm="channel", channel_form="var_unbiased", norm_bias=True); the baseline "only+bias" is
  x + b (norm="bias"), the same parameters ("so that the expressive power is exactly the same",
  the notebook's cell 8).
- init: PyTorch's default Conv1d init, U(+-1/sqrt(fan_in)) for the weights (fan_in = 4 * 3, and
  4 for the head) and the head bias; b starts at 0 (include/onedim.py:84, 109-110;
  init="pytorch").
- data (`fit`, include/onedim.py:220-227; the notebook's cell 3): input uniform [0, 1) noise of
  shape (1, 4, 1024), fixed during training; target the step, 1 on the first 512 samples and 0
  on the last 512.
- loss: torch.nn.MSELoss (mean over the 1024 outputs); torch.optim.SGD(lr=0.1, momentum=0.9) on
  every parameter, no weight decay, no schedule, 2000 iterations (include/onedim.py:237-239;
  cells 5 and 9): heavy-ball momentum v <- 0.9 v + g, w <- w - 0.1 v.
- observables: the loss (`mse_wrt_noisy`, here every `record_every` iterations) and
  ||dL/dW||_2 of the 12 convs and the head's 1x1 conv (`grad_init`, layer 12 the head; record 1
  holds the gradient at initialization).
The authors printed a loss of 3.7e-5 at iteration 1990 with channel norm and 0.25 without.
What moved: nothing of the network, data or optimizer; the authors ran one unseeded run per
mode, each with a fresh input; we run 8 seeds, each with its own initialization and input
(`fresh_input`; `--set fresh_input=false` shares the draw of `input_seed`); `--set
scale=paper` takes 20 seeds.
"""

import functools

import dynamics as dyn
from sweeps import Sweep
from sweeps.configs.channel_norm_depth import (
    fresh_uniform_input,
    grad_at_interval_start,
    step_data,
)


def build(steps, record_every, norm, channels, depth, kernel, n, input_seed, fresh_input=True):
    model = dyn.deep_decoder(
        channels,
        depth,
        in_channels=channels,
        out_channels=1,
        kernel=kernel,
        dim=1,
        upsample=1,
        norm=norm,
        channel_form="var_unbiased",
        norm_bias=True,
        head_bias=True,
        eps=1e-5,
        padding="circular",
        output="sigmoid",
        init="pytorch",
    )
    return dyn.RunSpec(
        model=model,
        data=step_data(n, channels, input_seed),
        loss="square",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        steps=steps,
        record_every=record_every,
        observables=("loss", grad_at_interval_start(record_every)),
        sampling="full",
        data_transform=fresh_uniform_input if fresh_input else None,
    )


SWEEP = Sweep(
    name="channel_norm_decoder",
    description="Dai & Heckel 2019: 12-layer 4-channel 1-D ReLU decoder fitting a step, "
    "channel norm | bias only",
    build=build,
    settings=dict(
        steps=2000,
        record_every=10,
        norm="bias",
        channels=4,
        depth=12,
        kernel=3,
        n=1024,
        input_seed=0,
        fresh_input=True,
    ),
    grid=dict(seed=list(range(8)), lr=[0.1], momentum=[0.9]),
    static=dict(norm=["bias", "channel"]),
    scales=dict(paper=dict(seed=list(range(20)))),
    keep_params=False,  # the figure reads records only
)
