"""Layer lists kept stacked (`dynamics.stacks.LayerList`): the list they stand for, the same
draws from `init_stacked` as from `init`, the same outputs and gradients, and runs carried
stacked (RunSpec.stack_layers, the default for models that take it with an autodiff gradient)
equal to runs carried as lists, to float32 rounding; the stacked step's program does not grow
with depth."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import stacks, steps
from dynamics.train import RunSpec, make_run, stacked_layers

RTOL, ATOL = 2e-5, 2e-6


def _close(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


def _layers(n=5, shape=(3, 4)):
    k = jax.random.key(0)
    out = [{"w": jax.random.normal(jax.random.fold_in(k, i), shape)} for i in range(n)]
    out.insert(0, {"w": jnp.ones((4, 2))})
    out.append({"w": jnp.ones((1, 3)), "b": jnp.zeros(1)})
    return out


def test_layer_list_is_the_list_it_stands_for():
    p = _layers()
    P = stacks.pack(p)
    assert P.counts == (1, 5, 1)
    assert len(P) == len(p) == 7
    for k in range(-7, 7):
        assert set(P[k]) == set(p[k])
        for n in p[k]:
            np.testing.assert_array_equal(P[k][n], p[k][n])
    for a, b in [(1, -1), (0, 3), (2, 4), (3, 7), (5, 5)]:
        sub = P[a:b]
        assert isinstance(sub, stacks.LayerList) and len(sub) == len(p[a:b])
        _close(stacks.unpack(sub), p[a:b], f"slice {a}:{b}")
    _close(list(P), p, "iteration")
    _close(stacks.unpack(P), p, "unpack")
    with pytest.raises(IndexError):
        P[7]
    # a pytree keeping its layout: tree maps, flatten/unflatten
    Q = jax.tree.map(lambda a: 2 * a, P)
    assert isinstance(Q, stacks.LayerList) and Q.counts == P.counts
    _close(stacks.unpack(Q), jax.tree.map(lambda a: 2 * a, p), "tree.map")


def test_per_layer_and_tree_packing():
    p = _layers()
    P = stacks.pack(p)
    sq = lambda layer: sum(jnp.sum(x**2) for x in jax.tree.leaves(layer))  # noqa: E731
    _close(stacks.per_layer(sq, P), stacks.per_layer(sq, p), "per_layer")
    assert stacks.per_layer(sq, P).shape == (7,)
    # a state holding lists where the template holds LayerLists, packed back to the layout
    tree = {"params": p, "count": jnp.ones(()), "mom": p}
    template = {"params": P, "count": jnp.ones(()), "mom": P}
    packed = stacks.pack_tree(template, tree)
    assert packed["mom"].counts == P.counts
    _close(stacks.unpack_tree(packed), tree, "pack_tree")


FACTORIES = {
    "mlp": lambda: dyn.mlp((5, 8, 8, 8, 8, 3)),
    "mlp_pytorch_bias_bn": lambda: dyn.mlp(
        (5, 8, 8, 8, 3), init="pytorch", bias=True, norm="batch", affine=True
    ),
    "mlp_orthogonal": lambda: dyn.mlp((8, 8, 8, 8, 8), init="orthogonal", activation="linear"),
    "linear_conv1d_head": lambda: dyn.linear_conv1d(
        5, kernel=3, channels=2, norm="channel", norm_bias=True, head="sigmoid"
    ),
    "deep_decoder": lambda: dyn.deep_decoder(4, 4, in_channels=3, dim=1, upsample=1),
    "cnn_bn": lambda: dyn.cnn((2, 6, 6), (4, 4, 4), 3, norm="batch", bias=True),
}
INPUTS = {
    "mlp": (6, 5),
    "mlp_pytorch_bias_bn": (6, 5),
    "mlp_orthogonal": (6, 8),
    "linear_conv1d_head": (3, 2, 12),
    "deep_decoder": (2, 3, 12),
    "cnn_bn": (4, 2, 6, 6),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_stacked_init_apply_and_gradient_equal_the_lists(name):
    m = FACTORIES[name]()
    key = jax.random.key(3)
    p = m.init(key)
    P = m.init_stacked(key)
    assert isinstance(P, stacks.LayerList) and len(P) == len(p)
    assert max(P.counts) > 1, P.counts  # a stack was formed
    _close(stacks.unpack(P), p, f"{name}: init_stacked vs init")
    x = jax.random.normal(jax.random.key(1), INPUTS[name])
    state = dyn.models.init_state(m, key)

    def out(params):
        f = dyn.models.forward(m, params, state or None, x, None, train=True)
        return f.y, f.state

    (y1, s1), (y2, s2) = out(p), out(P)
    _close(y2, y1, f"{name}: output")
    _close(s2, s1, f"{name}: model state")
    loss = lambda params: jnp.sum(out(params)[0] ** 2)  # noqa: E731
    _close(stacks.unpack(jax.grad(loss)(P)), jax.grad(loss)(p), f"{name}: gradient")


@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
@pytest.mark.parametrize("name", ["mlp", "linear_conv1d_head", "cnn_bn"])
def test_stacked_spectra_equal_the_lists(name, method):
    """Spectra of a LayerList: one batched call per segment, the same values (and NaN padding)
    as layer by layer."""
    p = FACTORIES[name]().init(jax.random.key(4))
    P = stacks.pack(p)
    a = dyn.observables.singular_values(P, method=method)
    b = dyn.observables.singular_values(p, method=method)
    assert a.shape == b.shape == (len(p), max(min(w.shape) for w in dyn.models.layer_weights(p)))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    c = dyn.observables.singular_values(P, pad_to=9, method=method)
    assert c.shape == (len(p), 9) and np.isnan(np.asarray(c)[:, 8]).all()


def _data():
    return dyn.data.teacher_regression(n_train=48, n_test=0, d_in=5, d_out=3, seed=0)


def _pair(spec_kwargs, hp=None, seeds=2):
    """The trace of the same runs carried stacked and as lists."""
    out = []
    for stack in (True, False):
        spec = RunSpec(**spec_kwargs, stack_layers=stack)
        assert stacked_layers(spec) == stack
        run = make_run(spec)
        hp_ = hp or dyn.hparams(lr=jnp.full((seeds,), 0.05))
        out.append(jax.jit(jax.vmap(run))(hp_, jax.random.split(jax.random.key(0), seeds)))
    return out


OBSERVED = (
    "loss",
    "rho",
    "layer_norm",
    "grad_norm",
    "grad_cos",
    "update_size",
    "sv",
    "rank",
    "stable_rank",
    "mean_rank",
    "effective_lr",
)


def test_stacked_runs_equal_list_runs():
    m = dyn.mlp((5, 8, 8, 8, 8, 3), bias=True)
    a, b = _pair(
        dict(
            model=m,
            data=_data(),
            steps=20,
            record_every=5,
            batch=16,
            observables=OBSERVED,
            gradient="autodiff",
            keep_state=True,
            stepper=functools.partial(steps.sgd, momentum="heavy_ball"),
        ),
        hp=dyn.hparams(lr=jnp.full((2,), 0.05), weight_decay=jnp.full((2,), 1e-3)),
    )
    for n in OBSERVED:
        _close(a[n], b[n], n)
    assert isinstance(a["final_state"].state.params, list)
    _close(a["final_state"], b["final_state"], "final_state")


def test_stacked_per_layer_multipliers_and_decay_mask():
    m = dyn.mlp((5, 8, 8, 8, 8, 3))
    mults = [1.0, 0.5, 2.0, 1.0, {"w": jnp.linspace(0.5, 1.5, 3)}]
    stepper = functools.partial(steps.sgd, lr_scale=mults, decay_mask=[1.0, 0.0, 1.0, 1.0, 0.0])
    a, b = _pair(
        dict(
            model=m,
            data=_data(),
            steps=10,
            record_every=5,
            batch=16,
            observables=("loss", "layer_norm"),
            gradient="autodiff",
            stepper=stepper,
        ),
        hp=dyn.hparams(lr=jnp.full((2,), 0.05), weight_decay=jnp.full((2,), 0.1)),
    )
    for n in ("loss", "layer_norm"):
        _close(a[n], b[n], n)


def test_stacked_normalized_gd_and_batchnorm_runs():
    for m, stepper, obs in [
        (dyn.mlp((5, 8, 8, 8, 3), weight_param="lagrange"), steps.normalized_gd, ("loss", "rho")),
        (
            dyn.mlp((5, 8, 8, 8, 3), norm="batch", affine=True),
            steps.sgd,
            ("loss", "rho_eff", "grad_norm"),
        ),
    ]:
        a, b = _pair(
            dict(
                model=m,
                data=_data(),
                steps=10,
                record_every=5,
                batch=16,
                observables=obs,
                stepper=stepper,
            )
        )
        for n in obs:
            _close(a[n], b[n], n)


def test_stacked_run_continues_from_its_kept_state():
    data = dyn.data.teacher_regression(n_train=32, n_test=0, d_in=5, d_out=3, seed=1)
    m = dyn.mlp((5, 8, 8, 8, 8, 3))
    kw = dict(
        model=m,
        data=data,
        record_every=5,
        batch=8,
        observables=("loss", "grad_norm"),
        keep_state=True,
        gradient="autodiff",
        stepper=functools.partial(steps.adam),
    )
    hp = dyn.Hparams(lr=0.01)
    key = jax.random.key(4)
    full = jax.jit(make_run(RunSpec(steps=20, **kw)))(hp, key)
    half = jax.jit(make_run(RunSpec(steps=10, **kw)))(hp, key)
    rest = jax.jit(make_run(RunSpec(steps=20, **kw), start=10))(hp, key, None, half["final_state"])
    _close(rest["loss"], full["loss"][3:], "continued loss")
    _close(rest["final_state"], full["final_state"], "continued state")


def _step_eqns(depth, stack):
    m = dyn.mlp((5,) + (8,) * (depth - 1) + (3,))
    spec = RunSpec(
        m,
        _data(),
        steps=5,
        record_every=5,
        batch=16,
        observables=("loss", "grad_norm", "grad_cos", "layer_norm", "sv", "rank"),
        gradient="autodiff",
        stack_layers=stack,
    )
    run = make_run(spec)
    jaxpr = jax.make_jaxpr(run)(dyn.Hparams(lr=0.1), jax.random.key(0))

    def count(j):
        n = 0
        for e in j.eqns:
            n += 1
            for p in e.params.values():
                subs = p if isinstance(p, (list, tuple)) else [p]
                for s in subs:
                    if hasattr(s, "jaxpr"):
                        n += count(s.jaxpr)
                    elif hasattr(s, "eqns"):
                        n += count(s)
        return n

    return count(jaxpr.jaxpr)


def test_stacked_run_program_does_not_grow_with_depth():
    """The whole run's program (init, steps, per-step gradient statistics, per-layer norms and
    spectra at the records) has as many operations at depth 40 as at depth 6 when carried stacked; carried
    as lists it grows with depth (the check can fail)."""
    s6, s40 = _step_eqns(6, True), _step_eqns(40, True)
    assert s40 == s6, (s6, s40)
    l6, l40 = _step_eqns(6, False), _step_eqns(40, False)
    assert l40 > l6 + 100, (l6, l40)


def test_a_replaced_init_is_the_one_a_stacked_run_draws():
    """`model._replace(init=...)` (a config's own init) keeps the factory's init_stacked, which
    draws the old init: the runner must pack the new one instead."""
    base = dyn.mlp((5, 8, 8, 8, 8, 3))

    def halved(key):
        return [{**p, "w": 0.5 * p["w"]} for p in base.init(key)]

    m = base._replace(init=halved)
    key = jax.random.key(2)
    _close(stacks.unpack(dyn.models.stacked_init(m)(key)), halved(key), "stacked_init")
    a, b = _pair(
        dict(
            model=m,
            data=_data(),
            steps=5,
            record_every=5,
            batch=16,
            observables=("loss", "layer_norm"),
            gradient="autodiff",
        )
    )
    _close(a["layer_norm"], b["layer_norm"], "layer_norm")
    _close(a["loss"], b["loss"], "loss")
