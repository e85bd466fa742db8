"""P7 (c), the mechanism of the half-precision claim, as a stress test of our own (not the
authors' protocol, which is `lp_batchnorm`): the same networks and training with every input
multiplied by `input_scale` = 1000. A batch norm after the first layer makes the function and
its gradients independent of that factor in exact arithmetic (f(W, s x) = f(s W, x) = f(W, x),
and the gradient with respect to W is unchanged), so in float32 these runs would be the unscaled
ones up to eps (tests/test_repro_norm_matters.py checks the gradients); only the range of the
first layer's pre-activations changes. In float16 (max
65504) the L2 norm squares them: where |x - mu| > 256 the variance overflows to inf and the
layer outputs 0, while L1 (mean |x - mu|, summed in float32) and top-k (no squares) stay in
range. Static: bn_p, in float16 (the float32 counterparts are `lp_batchnorm`'s).
"""

from sweeps import Sweep
from sweeps.configs.lp_batchnorm import NORMS, SETTINGS, build

SWEEP = Sweep(
    name="lp_batchnorm_stress",
    description="P7 stress test (ours): the lp_batchnorm float16 runs with inputs x 1000, which "
    "BN makes irrelevant in exact arithmetic",
    build=build,
    settings={**SETTINGS, "input_scale": 1000.0},
    grid=dict(seed=[0, 1, 2], lr=[0.1], weight_decay=[1e-4], momentum=[0.9]),
    static=dict(bn_p=list(NORMS), precision=["float16"]),
)
