"""P8 of REPRODUCTIONS.md: a one-neuron ResNet is a universal approximator, a fully connected
ReLU network of width d is not (Lin & Jegelka, NeurIPS 2018, arXiv 1806.10909).

The paper's illustration (section 3, figure 2; no public code): in d = 2, the unit ball against
a surrounding ring; fully connected ReLU networks of width d = 2 leave the positive class with
an unbounded region (every level-set component of a network of width <= d is unbounded, Lu et
al. 2017, Hanin & Sellke 2017), the ResNet with one-neuron blocks x + V relu(U x + b) (U (1, d),
V (d, 1)) carves out the ball. What we could not read off the paper (sample counts, ring radii,
optimizer, length, init) is chosen here and stated:

- Data (`geometry.ball_ring`): 2000 training and 2000 test points, half uniform in the unit
  disc (+1), half uniform in the ring 1.5 <= ||x|| <= 2.5 (-1).
- Models (static axis `arch`), all of the same depth (10 hidden layers) and a linear readout:
  "resnet": `geometry.one_neuron_resnet(2, depth, 1)`: `dyn.resnet_one_neuron`'s blocks
  (U He-Gaussian, b = 0, V ~ N(0, 1)) and a readout W x + c with bias (nn.Linear's);
  "fc2", "fc3": `dyn.mlp` of width 2 (= d) and 3 (= d + 1, the control: width d + 1 can
  bound a region) with biases (zero at init) and the same He-Gaussian weights, initialized
  *alive* (`geometry.live_init`: init keys are redrawn until the output varies over the
  training inputs; at depth 10, 36 of 40 width-2 and 20 of 40 width-3 inits are dead on this
  data, which would make the comparison one of trainability, not of expressivity). PyTorch's
  default init (U(+-1/sqrt(fan_in)), gain 1/sqrt 3) is not used: through 10 layers of width 2
  or 3 it shrinks the signal until the output varies by ~1e-4 over the data (2e-4 at most,
  measured), and 14 of the 16 width-2 and width-3 runs of this sweep stayed dead with it.
- Loss: logistic on the sign output (`geometry.logistic_loss`, BCEWithLogits); Adam
  (`dyn.adam`, b = (0.9, 0.999)), lr {0.003, 0.01} as a grid axis; minibatches of 128 without
  replacement; 2000 steps (128 epochs); 4 seeds.
- Recorded: training / test accuracy every 200 steps; the fraction of positive predictions on
  circles of radius 5 (twice the ring) and 20 (8x the ring), 3600 points each
  (`geometry.positive_fraction`): 0 on the far circle means the positive region does not reach
  it; the decision values on a 61 x 61 grid of [-3, 3]^2 at initialization and at the end
  (`geometry.decision_values`, costly tier) for the decision-region figure.

24 runs in 3 programs: 77 s of wall time from a cold compilation cache (compile 35 s, run 33 s)
on the 2-core machine shared with other jobs at load ~4. `--set scale=paper`: depths 5, 10 and 20 and 10 seeds (the paper's
figure compares several depths; its exact depths are not stated in what we read).
"""

import dynamics as dyn
from dynamics import geometry as geo
from sweeps import Sweep

ARCHS = ("resnet", "fc2", "fc3")


def model_for(arch: str, depth: int, x_train):
    if arch == "resnet":
        return geo.one_neuron_resnet(2, depth, 1)
    if arch in ("fc2", "fc3"):
        width = int(arch[2:])
        base = dyn.mlp((2,) + (width,) * depth + (1,), bias=True)
        return geo.live_init(base, x_train)
    raise ValueError(f"arch: must be one of {ARCHS}, got {arch!r}")


def observables(grid_lim, grid_n, n_circle):
    return (
        "loss",
        "accuracy",
        "test_accuracy",
        geo.positive_fraction(geo.circle_points(5.0, n_circle), name="positive_r5"),
        geo.positive_fraction(geo.circle_points(20.0, n_circle), name="positive_r20"),
        geo.decision_values(geo.grid_points(grid_lim, grid_n), name="decision"),
    )


def build(
    arch, depth, steps, record_every, n_train, n_test, ring, batch, grid_lim, grid_n, n_circle
):
    data = geo.ball_ring(seed=0, n_train=n_train, n_test=n_test, ring=tuple(ring))
    return dyn.RunSpec(
        model=model_for(arch, depth, data.x_train),
        data=data,
        loss=geo.logistic_loss,
        stepper=dyn.adam,
        steps=steps,
        record_every=record_every,
        slow_every=steps // record_every,
        observables=observables(grid_lim, grid_n, n_circle),
        batch=batch,
        sampling="permutation",
        eval_size=None,
    )


SWEEP = Sweep(
    name="one_neuron_resnet",
    description="Lin & Jegelka 2018: ball vs ring in 2-D, one-neuron ResNet vs width-2/3 ReLU nets of depth 10, Adam; decision regions",
    build=build,
    settings=dict(
        arch="resnet",
        depth=10,
        steps=2000,
        record_every=200,
        n_train=2000,
        n_test=2000,
        ring=(1.5, 2.5),
        batch=128,
        grid_lim=3.0,
        grid_n=61,
        n_circle=3600,
    ),
    grid=dict(seed=[0, 1, 2, 3], lr=[0.003, 0.01]),
    static=dict(arch=list(ARCHS), depth=[10]),
    scales=dict(paper=dict(depth=[5, 10, 20], seed=list(range(10)))),
)
