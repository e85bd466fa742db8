"""P7 (c): L1 and L-infinity (top-k) batch norm train as well as L2 batch norm, in float32 and
in half precision (Hoffer, Banner, Golan, Soudry, arXiv 1803.01814, section 5), under the
authors' definitions (citations in docs/protocols/P7.md section A):

- Normalizations (eladhoffer/norm_matters models/lp_norm.py; convNet.pytorch
  models/modules/lp_norm.py): l2 (x - mu) / sqrt(mean (x - mu)^2 + 1e-5); l1 (x - mu) /
  (sqrt(pi/2) mean |x - mu| + 1e-5); top-k (x - mu) / (c_n mean(top_k |x - mu|) + 1e-5),
  c_n = (1 + sqrt(pi ln 4)) / (2 sqrt(2 ln n)), n the values per channel in the batch, k = 10
  (convNet.pytorch's TopkBatchNorm2d, the updated code norm_matters' README points to, and
  its GhostTopk "Top10"; norm_matters' own TopkBatchNorm2d defaults to k = 1). All three are
  `dyn.mlp(norm="batch", bn_p=...)`, affine with weight 1 and bias 0 at initialization
  (convNet.pytorch models/resnet.py init_model).
- Half precision (`precision`): the forward and backward passes in bfloat16 or float16,
  batch norm included (norm_matters main.py casts the whole model with model.type(half)),
  batch sums accumulated in float32 as PyTorch reduces half tensors, float32 master weights
  (convNet.pytorch's use_float_copy; norm_matters keeps none), no loss scaling. Recorded:
  `test_accuracy` (eval mode, float32) and `test_accuracy_half` (eval mode in the run's
  precision, as the authors' half model evaluates).
- Optimizer (norm_matters models/resnet.py regime): SGD lr 0.1, momentum 0.9, weight decay
  1e-4, lr x 0.1 at epochs 81, 122 and 164 of the CIFAR ResNet's run; batch 128; cross-entropy.

CPU scale (what moved): ResNet-56 on CIFAR-10 becomes an MLP on sklearn's digits (per-pixel
standardized, no augmentation), 3 hidden layers of 64 (Linear -> BN -> ReLU), 60 epochs with the
lr drops at the same fractions of the run as epochs 81, 122, 164 of 200 (24, 37, 49; the
authors also set wd to 0 at epoch 122, which a traced weight decay cannot follow: kept at 1e-4),
3 seeds. Differences kept: the running statistics are PyTorch's (momentum 0.1 on the divisor,
for all three norms; the authors' Lp classes keep 0.1 of the old value and average the
reciprocal), so the comparison varies the normalization only.
"""

import functools

import jax
import jax.numpy as jnp

import dynamics as dyn
from sweeps import Sweep
from sweeps.configs.norm_dynamics import Keyed
from sweeps.configs.norm_matters import digits_or_mnist

NORMS = ("l2", "l1", "linf")
PRECISIONS = ("float32", "bfloat16", "float16")
HALF = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def half_test_accuracy(model: dyn.Model, precision: str) -> dyn.Observable:
    """`test_accuracy_half`: test accuracy in eval mode with the parameters, the running
    statistics and the inputs cast to `precision` (the model evaluated as the authors' half
    model is; float32 / float64 runs: the plain eval)."""
    dtype = HALF.get(precision)

    def fn(ctx):
        cast = (lambda t: t) if dtype is None else functools.partial(_cast, dtype)
        f = dyn.forward(
            model, cast(ctx.params), cast(ctx.model_state), cast(ctx.data.x_test), train=False
        )
        return dyn.accuracy(f.y.astype(jnp.float32), ctx.data.y_test)

    return dyn.Observable(
        "test_accuracy_half",
        Keyed("test_accuracy_half", fn),
        doc="test accuracy in eval mode computed in the run's precision",
    )


def _cast(dtype, tree):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def scaled(data: dyn.Dataset, s: float) -> dyn.Dataset:
    """The data set with every input multiplied by s (a batch norm after the first layer makes
    the function and its gradients independent of s in exact arithmetic)."""
    if s == 1:
        return data
    return dyn.Dataset(
        data.x_train * s, data.y_train, data.x_test * s, data.y_test, data.num_classes, data.name
    )


def build(
    epochs,
    record_every,
    bn_p,
    precision,
    k,
    input_scale,
    dataset,
    data_root,
    width,
    depth,
    batch,
    milestones,
):
    if bn_p not in NORMS:
        raise ValueError(f"bn_p must be one of {NORMS}, got {bn_p!r}")
    data = scaled(digits_or_mnist(dataset, data_root), float(input_scale))
    model = dyn.mlp(
        (data.x_train.shape[1],) + (width,) * depth + (data.num_classes,),
        bias=True,
        norm="batch",
        bn_p=bn_p,
        bn_k=k,
        affine=True,
        eps=1e-5,
        init="pytorch",
    )
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="cross_entropy",
        stepper=functools.partial(dyn.sgd, momentum="heavy_ball"),
        epochs=epochs,
        record_every=record_every,
        batch=batch,
        lr_schedule=dyn.step_decay(tuple(milestones), 0.1),
        observables=(
            "loss",
            "accuracy",
            "test_loss",
            "test_accuracy",
            half_test_accuracy(model, precision),
        ),
        eval_size=None,
        precision=precision,
    )


SETTINGS = dict(
    epochs=60,
    record_every=5,
    bn_p="l2",
    precision="float32",
    k=10,
    input_scale=1.0,
    dataset="digits",
    data_root="",
    width=64,
    depth=3,
    batch=128,
    milestones=(24, 37, 49),
)

SWEEP = Sweep(
    name="lp_batchnorm",
    description="P7 Hoffer et al.: L2 / L1 / top-10 batch norm on a digits MLP, trained in "
    "float32, bfloat16 and float16 (SGD+momentum, the authors' regime)",
    build=build,
    settings=SETTINGS,
    grid=dict(seed=[0, 1, 2], lr=[0.1], weight_decay=[1e-4], momentum=[0.9]),
    static=dict(bn_p=list(NORMS), precision=list(PRECISIONS)),
    scales=dict(
        paper=dict(
            dataset="mnist",
            data_root="data/mnist",
            width=256,
            epochs=200,
            milestones=(81, 122, 164),
            record_every=10,
        )
    ),
)
