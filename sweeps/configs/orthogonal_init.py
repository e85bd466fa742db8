"""P9 of REPRODUCTIONS.md: orthogonal vs Gaussian initialization of deep linear networks (Hu,
Xiao & Pennington, "Provable benefit of orthogonal initialization in optimizing deep linear
networks", ICLR 2020, arXiv 2001.05992). The authors released no code; every fact below is from
the paper's text.

- Network (their section 3, problem setup; `orthogonal.hu_linear`): f(x) = W_L ... W_1 x /
  sqrt(m^{L-1} d_y), no biases, no activation, W_1 (m, d_x), W_k (m, m), W_L (d_y, m).
- Initializations (static axis `init`): "gaussian", every entry N(0, 1) (section 5, the
  Gaussian lower bound); "orthogonal", W_1^T W_1 = m I, W_k^T W_k = m I, W_L W_L^T = m I
  (section 4). For widths below d_x (outside the paper's assumption m >= d_x, but in their
  experiment: widths from 10 with d_x = 1024) W_1 has orthonormal rows scaled to W_1 W_1^T =
  d_x I_m (`orthogonal.semi_orthogonal`: entries of variance 1, as the Gaussian's).
- Loss (section 3): (1/2) ||f(X) - Y||_F^2, a sum (`orthogonal.hu_loss`).
- Optimizer (section 4, Theorem 4.1): full-batch gradient descent at eta = d_y / (2 L ||X||^2)
  (`orthogonal.hu_lr`), which depends on the depth: the traced `lr` axis is the step size in
  units of eta (lr = 1: the theorem's), applied through `orthogonal.LrFactor(eta)`.
- Bound (Theorem 4.1): with orthogonal init, m >= d_x and m above a constant times
  r kappa^2 (d_y (1 + ||W*||^2) + log(r / delta)) (constant unspecified),
  loss_t <= (1 - eta L sigma_min(X)^2 / (4 d_y))^t loss_0; figures/orthogonal_init.py draws it.
- Data (section 6): X (d_x, n), W* (d_y, d_x) with N(0, 1) entries, Y = W* X (`hu_data`).
- Measure (section 6, figure 1): the training loss over steps; the map is of the final
  loss ratio loss_T / loss_0 over depth x width, for both inits.

CPU scale (the default; only the scale moved): d_x = 64, n = 8, d_y = 4 (paper 1024, 16, 10);
widths {8, 16, 32, 64, 128} (paper 10-1000); depths {2, 8, 32, 64, 128} (paper 1-700); 3
seeds of the init (one data set, data_seed 0, as their "fixed synthetic dataset"); 500 steps
(the bound at this data reaches 1e-3 of loss_0 in about 250), recorded every 10. Their number
of steps is not stated in what we read.

Programs: init x depth x width are static axes, 50 programs of 3 runs each. Depth cannot be
masked (`hu_linear` draws its layers from split(key, depth), so no `models.Stack`); widths can
(`hu_linear` has a `models.Width`: `--set width_strategy=mask`, 10 programs), but "auto" keeps
one program per width: at widths 8 ... 128, 73% of the widest model's parameters would be
padding. Measured from nothing on the shared 2-core machine (2026-12-05, empty cache, new
process each): one program per width compile 58.7 s (50 programs) + run 41.5 s; widths masked
32.5 s (10 programs) + 126.0 s. The two stores agree to float rounding where the runs are not
chaotic (depth 2: loss within 2e-7 of loss_0); the Gaussian runs at depths >= 32 and the narrow
orthogonal ones at depth 128 amplify rounding at the theorem's step size (changing lr by one
float32 ulp moves their losses as much: up to 0.3 x loss_0), and the depth-128 width-8
orthogonal worst seed sits at the figure's 1e-3 threshold (5.0e-4 masked, 1.5e-3 per width).

`--set scale=paper`: d_x = 1024, n = 16, d_y = 10, widths {10, 30, 100, 300, 1000}, depths
{1, 10, 50, 100, 200, 400, 700}, 5 seeds, 2000 steps (a GPU job; the widths and depths are
points of their ranges, not their exact grid, which the text does not list).
"""

import dynamics as dyn
from dynamics import orthogonal as orth
from sweeps import Sweep


def build(init, depth, width, d_x, n, d_y, steps, record_every, data_seed):
    data = orth.hu_data(d_x, n, d_y, seed=data_seed)
    return dyn.RunSpec(
        model=orth.hu_linear(d_x, width, depth, d_y, init=init),
        data=data,
        loss=orth.hu_loss,
        stepper=dyn.sgd,
        steps=steps,
        record_every=record_every,
        sampling="full",
        lr_schedule=orth.LrFactor(orth.hu_lr(data.x_train, depth, d_y)),
        observables=("loss",),
        eval_size=None,
    )


SWEEP = Sweep(
    name="orthogonal_init",
    description="Hu, Xiao & Pennington 2020: deep linear nets, orthogonal vs Gaussian init, GD at the theorem's lr; trainable map over depth x width",
    build=build,
    settings=dict(
        init="orthogonal",
        depth=8,
        width=64,
        d_x=64,
        n=8,
        d_y=4,
        steps=500,
        record_every=10,
        data_seed=0,
    ),
    grid=dict(seed=[0, 1, 2], lr=[1.0]),
    static=dict(
        init=list(orth.HU_INITS),
        depth=[2, 8, 32, 64, 128],
        width=[8, 16, 32, 64, 128],
    ),
    scales=dict(
        paper=dict(
            d_x=1024,
            n=16,
            d_y=10,
            width=[10, 30, 100, 300, 1000],
            depth=[1, 10, 50, 100, 200, 400, 700],
            seed=list(range(5)),
            steps=2000,
            record_every=20,
        )
    ),
)
