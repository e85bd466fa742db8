"""P12 of REPRODUCTIONS.md: statistics of hidden representations (Choi, Lee, Shin, Rhee,
arXiv 1811.03666).

The paper's claims: representation statistics (correlation between units, sparsity, dead
units, rank) that regularizers target are only loosely related to performance; for a linear
layer any invertible affine map of its representation, undone in the next layer, gives a
network with identical outputs ("identical output network") and different statistics, so a
statistic such as the correlation says nothing about accuracy by itself.

Here (CPU scale): sklearn's digits (1438 training, 359 test images, pixels / 16 standardized per
pixel with the training statistics), a ReLU MLP 64 -> 100 -> 100 -> 100 -> 10 with biases and
PyTorch's default init, cross-entropy, Adam with the weight decay as L2 in the gradient
(`dyn.adam(weight_decay="l2")`), batches of 64 in shuffled epochs, 30 epochs; the spread of
networks comes from a grid of lr {1e-3, 3e-3, 1e-2} x weight decay {0, 1e-3, 1e-2} x 2 seeds
(the paper's spread comes from representation regularizers, which need the hidden layers in
the loss and are not in the library). Recorded every 10 epochs on the test images
(`representations.representation_statistics`): per hidden layer the fraction of zeros, dead
units, numerical rank (s_i / ||H||_F > 1e-3) and effective rank of the 359 x 100 representation
matrix, mean |correlation| between units, mean |h|; test accuracy. The final parameters are
kept in the store: the figure builds the identical-output networks from them
(`representations.insert_linear_layer`, `affine_identical_output`, `append_dead_units`,
`rescale_units`).

18 runs in one program: 17 s of wall time from a cold compilation cache (compile 11 s, run
3 s) on the 2-core machine shared with other jobs at load ~4. `--set scale=paper`: MNIST from `data_root` (the IDX files), the same
network widths with a 784-pixel input, 5 seeds.
"""

import functools

import dynamics as dyn
from dynamics import representations as rep
from sweeps import Sweep


def load_data(dataset: str, data_root: str):
    if dataset == "digits":
        return dyn.data.digits(seed=0, normalize="standard")
    if dataset == "mnist":
        return dyn.data.mnist(data_root, seed=0, normalize="standard")
    raise ValueError(f"dataset: must be 'digits' or 'mnist', got {dataset!r}")


def network(d_in: int, hidden: tuple[int, ...]) -> dyn.Model:
    return dyn.mlp((d_in, *hidden, 10), bias=True, init="pytorch")


def build(dataset, data_root, hidden, epochs, record_every, batch):
    data = load_data(dataset, data_root)
    model = network(data.x_train.shape[1], tuple(hidden))
    return dyn.RunSpec(
        model=model,
        data=data,
        loss="cross_entropy",
        stepper=functools.partial(dyn.adam, weight_decay="l2"),
        epochs=epochs,
        record_every=record_every,
        observables=(
            "loss",
            "accuracy",
            "test_loss",
            "test_accuracy",
            *rep.representation_statistics("x_test", model),
        ),
        batch=batch,
    )


SWEEP = Sweep(
    name="representations",
    description="Choi et al.: representation statistics (zeros, dead units, rank, |corr|) of a digits ReLU MLP over lr x weight decay; identical-output networks in the figure",
    build=build,
    settings=dict(
        dataset="digits",
        data_root="data/mnist",
        hidden=(100, 100, 100),
        epochs=30,
        record_every=10,
        batch=64,
    ),
    grid=dict(seed=[0, 1], lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.0, 1e-3, 1e-2]),
    scales=dict(paper=dict(dataset="mnist", seed=list(range(5)))),
    keep_params=True,
)
