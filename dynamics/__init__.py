"""dynamics: a functional training-dynamics simulator in JAX.

Models, step functions and observables as pure functions; `make_run(spec)` turns one training
run into one pure function `run(hp, key) -> trace` that vmaps over whole grids.
"""

from dynamics import data, losses, models, norms, observables, steps, train
from dynamics.data import Dataset
from dynamics.losses import accuracy, cross_entropy, measurement_loss, square_loss
from dynamics.models import (
    Model,
    cnn,
    deep_decoder,
    deep_linear,
    from_flax,
    from_nnx,
    layer_weight,
    layer_weights,
    linear_conv1d,
    mlp,
    resnet_one_neuron,
    scale_weights,
)
from dynamics.norms import batch_norm, channel_norm, lagrange_weight, tangent_project, weight_norm
from dynamics.observables import (
    balancedness,
    effective_lr,
    grad_cosines,
    grad_norms,
    layer_norms,
    margins,
    neural_collapse,
    numerical_rank,
    rho,
    sharpness,
    singular_values,
    stable_rank,
    update_sizes,
)
from dynamics.steps import (
    Batch,
    Hparams,
    Stepper,
    StepInfo,
    adam,
    gd,
    gradient_flow,
    normalized_gd,
    optax_stepper,
    sgd,
)
from dynamics.train import OBSERVABLES, RunData, RunSpec, describe, make_loss_fn, make_run

__version__ = "0.1.0"

__all__ = [
    "data", "losses", "models", "norms", "observables", "steps", "train",
    "Dataset",
    "accuracy", "cross_entropy", "measurement_loss", "square_loss",
    "Model", "cnn", "deep_decoder", "deep_linear", "from_flax", "from_nnx", "layer_weight",
    "layer_weights", "linear_conv1d", "mlp", "resnet_one_neuron", "scale_weights",
    "batch_norm", "channel_norm", "lagrange_weight", "tangent_project", "weight_norm",
    "balancedness", "effective_lr", "grad_cosines", "grad_norms", "layer_norms", "margins",
    "neural_collapse", "numerical_rank", "rho", "sharpness", "singular_values", "stable_rank",
    "update_sizes",
    "Batch", "Hparams", "Stepper", "StepInfo", "adam", "gd", "gradient_flow", "normalized_gd",
    "optax_stepper", "sgd",
    "OBSERVABLES", "RunData", "RunSpec", "describe", "make_loss_fn", "make_run",
]
