"""P6, the whitening invariance (Ergen et al., arXiv 2103.01499): the runs of `convex_bn` at
width 40 on the same data with the singular values of the centred X replaced, U and V kept:
"white" (all equal to their geometric mean) and "ill" (spread geometrically over a condition
number of 100 about the same geometric mean). The convex program sees only U' = [1/sqrt(n), U],
so p* is the same for every spectrum (recorded per run as `p_star`); full-batch GD on the
network is not invariant: the paper's implicit bias toward the data's high-singular-value
directions. The "original" spectrum is `convex_bn`'s width-40 point.
"""

from sweeps import Sweep
from sweeps.configs.convex_bn import build

SWEEP = Sweep(
    name="convex_bn_whitening",
    description="P6 whitening invariance: the convex_bn runs (width 40) on X with its singular "
    "values set equal (white) or spread over a condition number 100 (ill)",
    build=build,
    settings=dict(
        steps=10000,
        record_every=100,
        n=24,
        d=2,
        width=40,
        spectrum="white",
        condition=100.0,
        beta=0.1,
        data_seed=0,
    ),
    grid=dict(seed=[0, 1, 2, 3], lr=[0.05], weight_decay=[0.1]),
    static=dict(d=[2, 50], spectrum=["white", "ill"]),
    scales=dict(paper=dict(n=30, steps=40000, record_every=200, seed=list(range(10)))),
)
