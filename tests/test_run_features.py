"""make_run's newer capabilities against references written out by hand: model state (batch-norm
running statistics, eval mode), learning-rate schedules, training in epochs, users' own
observables, continuing a run from its kept state, rho_eff, train-mode margins, per-epoch
"dist", dead and invalid runs; and the clear errors of specs and hyperparameters that cannot
be right."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import losses, models, norms, steps, train
from dynamics import observables as obs
from dynamics.data import Dataset
from dynamics.steps import Batch, Hparams
from dynamics.train import RunSpec, make_run

N, D, C = 30, 5, 3


def _dataset(seed=0, n=N, n_test=8):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(C, D))
    y = rng.integers(0, C, n + n_test).astype(np.int32)
    x = (means[y] + rng.normal(size=(n + n_test, D))).astype(np.float32)
    return Dataset(x[:n], y[:n], x[n:], y[n:], C, "toy")


DATA = _dataset()


def _hp(lr=0.1, wd=0.0, bs=0, mu=0.0):
    return train.as_hparams(Hparams(lr, wd, bs, mu, 1.0))


# --------------------------------------------------------------------------- errors


def test_output_width_must_match_the_classes():
    digits = dyn.data.digits(seed=0, normalize="standard")
    for loss in ("cross_entropy", "square"):
        spec = RunSpec(dyn.mlp((64, 32, 5)), digits, loss=loss, steps=10, record_every=5, batch=8)
        with pytest.raises(ValueError, match=r"model: its output has 5 .* 10 classes"):
            spec.validate()
    binary = dyn.data.digits(seed=0, classes=(3, 5), binary=True)
    with pytest.raises(ValueError, match="need one output"):
        RunSpec(dyn.mlp((64, 8, 2)), binary, steps=10, record_every=5, batch=8).validate()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(batch=None), "batch: sampling='replacement' needs the static batch"),
        (dict(eval_size=0), "eval_size"),
        (dict(observables="loss"), r"observables: expected a tuple of names \(e.g. \('loss',\)\)"),
        (dict(observables=(obs.rho,)), "wrap your function as dynamics.Observable"),
        (dict(loss="crossentropy"), "did you mean 'cross_entropy'"),
        (dict(steps=10, epochs=2), "steps and epochs"),
        (dict(steps=None, epochs=3, record_every=2), "record_every"),
        (dict(observables=("loss", "dist")), "dist is the change over the last epoch"),
        (dict(rank_layers=(5,)), "rank_layers"),
        (dict(eval_mode="test"), "eval_mode"),
        (dict(precision="float8"), "precision"),
        (dict(sampling="epochs"), "sampling: 'epochs' needs"),
    ],
)
def test_specs_that_cannot_run_name_the_field(change, message):
    kw = dict(model=models.mlp((D, 8, C)), data=DATA, loss="cross_entropy", steps=10)
    kw.update(record_every=5, batch=8)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        RunSpec(**kw).validate()


def test_observables_refuse_what_is_not_a_model_s_params():
    w = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="params: expected a list with one dict per layer"):
        obs.rho(w)
    with pytest.raises(ValueError, match="flax variables dict"):
        obs.layer_norms({"params": {"Dense_0": {"kernel": w}}})
    assert float(obs.rho([{"w": w}])) == pytest.approx(np.sqrt(12.0))


SPEC = RunSpec(
    models.mlp((D, 8, C)),
    DATA,
    loss="cross_entropy",
    steps=6,
    record_every=3,
    batch=8,
    observables=("loss", "rho"),
)


def test_hparams_of_the_wrong_shape_are_refused():
    run = make_run(SPEC)
    with pytest.raises(ValueError, match=r"hp.lr: run\(hp, key\) takes one run's"):
        jax.jit(run)(dyn.hparams(lr=0.05), jax.random.key(0))
    with pytest.raises(ValueError, match="key: run"):
        jax.jit(run)(_hp(), jax.random.split(jax.random.key(0), 2))


def test_batch_size_above_the_static_batch_is_invalid_not_halved():
    run = make_run(SPEC)
    with pytest.raises(
        ValueError, match="hp.batch_size: 16 does not fit the spec's static batch 8"
    ):
        run(_hp(bs=16), jax.random.key(0))
    hp = jax.tree.map(lambda *v: jnp.stack(v), _hp(bs=16), _hp(bs=8), _hp(bs=4))
    keys = jax.random.split(jax.random.key(0), 3)
    tr = jax.jit(jax.vmap(run))(hp, keys)
    np.testing.assert_array_equal(np.asarray(tr["status"]), [3, 0, 0])
    assert np.isnan(np.asarray(tr["loss"][0])).all()
    assert np.isfinite(np.asarray(tr["loss"][1:])).all()


def test_a_dead_relu_network_is_flagged():
    """lr 5 on the square loss kills every ReLU of a bias-free net on digits: the output is 0 for
    every input; the run is marked dead (2), a healthy one finished (0)."""
    digits = dyn.data.digits(seed=0, normalize="standard", n_train=256)
    spec = RunSpec(
        dyn.mlp((64, 32, 32, 10)),
        digits,
        loss="square",
        steps=50,
        record_every=25,
        batch=32,
        observables=("loss", "rank"),
    )
    run = jax.jit(jax.vmap(make_run(spec)))
    hp = jax.tree.map(lambda *v: jnp.stack(v), _hp(lr=5.0), _hp(lr=0.05))
    tr = run(hp, jax.random.split(jax.random.key(0), 2))
    status = np.asarray(tr["status"])
    assert status[1] == 0
    assert status[0] == 2, np.asarray(tr["loss"])


# --------------------------------------------------------------------------- model state


BN = models.mlp((D, 6, 6, C), norm="batch", affine=True, bias=True, init="pytorch")


def test_batch_norm_running_statistics_follow_pytorch():
    """After one train-mode forward pass the running statistics are (1 - m) init + m (batch
    mean, unbiased variance) of the kept examples; eval mode normalizes with them."""
    params = BN.init(jax.random.key(1))
    state = models.init_state(BN)
    x = jnp.asarray(DATA.x_train[:10])
    mask = jnp.arange(10) < 7
    f = models.forward(BN, params, state, x, mask, train=True)
    h = x @ params[0]["w"].T + params[0]["b"][None]
    kept = np.asarray(h[:7], np.float64)
    np.testing.assert_allclose(f.state[0]["mean"], 0.1 * kept.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        f.state[0]["var"], 0.9 + 0.1 * kept.var(0, ddof=1), rtol=1e-5, atol=1e-6
    )
    assert f.state[-1] == {}
    ev = models.forward(BN, params, f.state, x, train=False)

    # eval mode: every layer normalized by the running statistics, by hand
    def bn(z, s, p):
        return (z - s["mean"][None]) / jnp.sqrt(s["var"][None] + 1e-5) * p["gamma"][None] + p[
            "beta"
        ][None]

    z = bn(h, f.state[0], params[0])
    z = bn(jax.nn.relu(z) @ params[1]["w"].T + params[1]["b"][None], f.state[1], params[1])
    y = jax.nn.relu(z) @ params[2]["w"].T + params[2]["b"][None]
    np.testing.assert_allclose(ev.y, y, rtol=1e-5, atol=1e-6)
    # and the train-mode output is the stateless apply's
    np.testing.assert_allclose(f.y, BN.apply(params, x, mask), rtol=1e-6)


def test_pytorch_init_draws_weights_and_biases_uniformly():
    params = models.mlp((50, 400, 3), bias=True, init="pytorch").init(jax.random.key(0))
    w, b = np.asarray(params[0]["w"]), np.asarray(params[0]["b"])
    bound = 1 / np.sqrt(50)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.05)
    assert b.var() == pytest.approx(bound**2 / 3, rel=0.2) and np.abs(b).max() > 0.8 * bound


def _bn_run(**kw):
    spec = RunSpec(
        BN,
        DATA,
        loss="cross_entropy",
        steps=8,
        record_every=4,
        batch=10,
        sampling="permutation",
        observables=("loss", "rho", "rho_eff", "accuracy"),
        eval_size=None,
        keep_state=True,
        **kw,
    )
    return spec, make_run(spec)


def test_runs_carry_the_model_state_and_evaluate_in_eval_mode():
    """A step-by-step reference of a BN network: SGD on permutation batches, the running
    statistics updated by each step's forward pass, the records in eval mode, rho_eff."""
    spec, run = _bn_run()
    hp, key = _hp(lr=0.2, wd=1e-3), jax.random.key(3)
    tr = jax.jit(run)(hp, key)
    k_init, k_data = jax.random.split(key)
    params = BN.init(k_init)
    state = models.init_state(BN)
    loss_fn = train.make_loss_fn(BN, "cross_entropy")
    stepper = steps.sgd(loss_fn)
    st = stepper.init_fn(params)
    n = DATA.x_train.shape[0]
    for t in range(1, 9):
        idx = jax.random.permutation(jax.random.fold_in(k_data, t), n)[:10]
        b = Batch(DATA.x_train[idx], DATA.y_train[idx], jnp.full((10,), 0.1), state)
        st, info = stepper.step_fn(st, b, hp)
        state = info.model_state
    final = tr["final_state"]
    np.testing.assert_allclose(final.model_state[0]["var"], state[0]["var"], rtol=1e-5)
    pred = models.forward(BN, st.params, state, jnp.asarray(DATA.x_train), train=False).y
    np.testing.assert_allclose(
        tr["loss"][-1], losses.cross_entropy(pred, jnp.asarray(DATA.y_train)), rtol=1e-4
    )
    rho_eff = obs.rho(st.params)
    for p, s in zip(st.params[:-1], state[:-1], strict=True):
        rho_eff = rho_eff * jnp.linalg.norm(p["gamma"]) / jnp.linalg.norm(jnp.sqrt(s["var"]))
    np.testing.assert_allclose(tr["rho_eff"][-1], rho_eff, rtol=1e-4)
    # at init (running var 1, gamma 1) rho_eff is rho; trained, the normalizations' scales count
    assert float(tr["rho_eff"][0]) == pytest.approx(float(tr["rho"][0]), rel=1e-6)
    assert float(tr["rho_eff"][-1]) != pytest.approx(float(tr["rho"][-1]), rel=1e-2)
    # train mode evaluation is a different number (batch statistics of the evaluated set)
    _, run_t = _bn_run(eval_mode="train")
    tr_t = jax.jit(run_t)(hp, key)
    assert float(tr_t["loss"][-1]) != pytest.approx(float(tr["loss"][-1]), rel=1e-3)


# --------------------------------------------------------------------------- schedules


def test_step_decay_schedule_factors():
    s = dyn.step_decay((2, 4), 0.5)  # epochs
    f = [float(s(t, 3, 30)) for t in range(1, 16)]  # 3 steps per epoch
    assert f == [1.0] * 6 + [0.5] * 6 + [0.25] * 3
    s = dyn.step_decay((3,), 0.1, unit="step")
    assert [float(s(t, 1, 10)) for t in (1, 3, 4)] == pytest.approx([1.0, 1.0, 0.1])
    c = dyn.cosine(final=0.1)
    assert float(c(1, 1, 10)) == pytest.approx(1.0)
    assert float(c(11, 1, 10)) == pytest.approx(0.1, abs=1e-6)
    w = dyn.warmup(4, then=dyn.constant())
    assert [float(w(t, 1, 10)) for t in (1, 2, 4, 5)] == [0.25, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="increasing"):
        dyn.step_decay((4, 2), 0.5)


def test_a_schedule_multiplies_the_applied_lr():
    """Full-batch GD with a step decay equals GD by hand with lr_t = lr * factor(t); update_size
    divides by the applied rate."""
    spec = RunSpec(
        models.mlp((D, 8, C)),
        DATA,
        loss="square",
        steps=6,
        record_every=3,
        sampling="full",
        lr_schedule=dyn.step_decay((3,), 0.1, unit="step"),
        observables=("loss", "update_size", "effective_lr"),
        keep_state=True,
        gradient="autodiff",
    )
    hp, key = _hp(lr=0.3), jax.random.key(0)
    tr = jax.jit(make_run(spec))(hp, key)
    params = spec.model.init(jax.random.split(key)[0])
    loss_fn = train.make_loss_fn(spec.model, "square")
    batch = Batch(jnp.asarray(DATA.x_train), jnp.asarray(DATA.y_train), jnp.full((N,), 1.0 / N))
    upd = []
    for t in range(1, 7):
        lr = 0.3 * (0.1 if t > 3 else 1.0)
        g = jax.grad(loss_fn)(params, batch)
        new = jax.tree.map(lambda w, gi, lr=lr: w - lr * gi, params, g)
        upd.append(
            [float(jnp.linalg.norm(b["w"] - a["w"])) / lr for a, b in zip(params, new, strict=True)]
        )
        params = new
    np.testing.assert_allclose(
        tr["final_state"].state.params[0]["w"], params[0]["w"], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(tr["update_size"][2], np.mean(upd[3:], axis=0), rtol=1e-4)
    wn = np.array([float(jnp.sum(p["w"] ** 2)) for p in params])
    np.testing.assert_allclose(tr["effective_lr"][-1], 0.03 / wn, rtol=1e-4)


# --------------------------------------------------------------------------- epochs


COUNT = dyn.Observable(
    "seen",
    lambda ctx: jnp.sum(ctx.batch.weights > 0).astype(jnp.float32),
    kind="step",
    reduce="sum",
    doc="examples seen",
)
WSUM = dyn.Observable("wsum", lambda ctx: jnp.sum(ctx.batch.weights), kind="step", reduce="min")


def _epoch_spec(batch, **kw):
    return RunSpec(
        models.mlp((D, 8, C)),
        DATA,
        loss="cross_entropy",
        epochs=4,
        record_every=2,
        batch=batch,
        observables=("loss", COUNT, WSUM, "dist", "dist_layer"),
        keep_state=True,
        **kw,
    )


def test_epochs_visit_every_example_once_with_the_last_batch_partial():
    for B in (4, 7, 30):
        spec = _epoch_spec(B)
        assert spec.steps_per_epoch == -(-N // B) and spec.record_axis == "epoch"
        tr = jax.jit(make_run(spec))(_hp(), jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(tr["seen"][1:]), [2 * N, 2 * N])
        np.testing.assert_allclose(np.asarray(tr["wsum"][1:]), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(tr["step"]), [0, 2, 4] * np.array(-(-N // B)))
        assert train.describe(spec)["loss"] == ("epoch",)


def test_epochs_follow_a_step_by_step_reference():
    """Epoch e's batches are consecutive slices of permutation(fold_in(k_data, e)); dist is the
    mean over layers of ||W(end) - W(start)|| / ||W(start)|| over the interval's last epoch."""
    B = 8
    spec = _epoch_spec(B)
    hp, key = _hp(lr=0.2, wd=1e-3), jax.random.key(4)
    tr = jax.jit(make_run(spec))(hp, key)
    k_init, k_data = jax.random.split(key)
    params = spec.model.init(k_init)
    loss_fn = train.make_loss_fn(spec.model, "cross_entropy")
    stepper = steps.sgd(loss_fn)
    st = stepper.init_fn(params)
    starts = {}
    for e in range(4):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, e), N))
        starts[e] = st.params
        for j in range(-(-N // B)):
            idx = perm[j * B : (j + 1) * B]
            b = Batch(DATA.x_train[idx], DATA.y_train[idx], jnp.full((len(idx),), 1 / len(idx)))
            st, _ = stepper.step_fn(st, b, hp)
        if e == 1:
            rel = [
                float(jnp.linalg.norm(a["w"] - b["w"]) / jnp.linalg.norm(b["w"]))
                for a, b in zip(st.params, starts[1], strict=True)
            ]
            np.testing.assert_allclose(tr["dist_layer"][1], rel, rtol=1e-4)
            np.testing.assert_allclose(tr["dist"][1], np.mean(rel), rtol=1e-4)
    np.testing.assert_allclose(
        tr["final_state"].state.params[0]["w"], st.params[0]["w"], rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- user observables


def test_user_observables_are_recorded_like_built_in_ones():
    w0 = dyn.Observable(
        "w0_norm",
        lambda ctx: jnp.stack([jnp.linalg.norm(p["w"]) for p in ctx.params]),
        dims=("layer",),
        doc="norm of every weight",
    )
    logits = dyn.Observable(
        "mean_logit", lambda ctx: jnp.mean(ctx.predict(ctx.data.x_eval)[0], axis=0), dims=("class",)
    )
    gmax = dyn.Observable(
        "gmax", lambda ctx: jnp.max(jnp.abs(ctx.grads[0]["w"])), kind="step", reduce="max"
    )
    spec = RunSpec(
        models.mlp((D, 8, C)),
        DATA,
        loss="cross_entropy",
        steps=6,
        record_every=3,
        batch=8,
        observables=("loss", "layer_norm", w0, logits, gmax),
    )
    assert train.describe(spec)["mean_logit"] == ("step", "class")
    tr = jax.jit(make_run(spec))(_hp(), jax.random.key(0))
    np.testing.assert_allclose(tr["w0_norm"], tr["layer_norm"], rtol=1e-6)
    assert tr["mean_logit"].shape == (3, C) and tr["gmax"].shape == (3,)
    assert np.isnan(tr["gmax"][0]) and (np.asarray(tr["gmax"][1:]) > 0).all()
    with pytest.raises(ValueError, match="built-in name"):
        RunSpec(SPEC.model, DATA, observables=(dyn.Observable("rho", w0.fn),), batch=8).validate()


# --------------------------------------------------------------------------- continuing a run


@pytest.mark.parametrize("length", ["steps", "epochs"])
def test_a_continued_run_equals_the_longer_run(length):
    kw = dict(
        model=models.mlp((D, 8, C)),
        data=DATA,
        loss="cross_entropy",
        record_every=2,
        batch=8,
        observables=("loss", "rho", "grad_corr", "rank", "sharpness"),
        keep_state=True,
        lr_schedule=dyn.step_decay((3,), 0.5),
        slow_every=2,
    )
    long = RunSpec(**kw, **{length: 8})
    short = RunSpec(**kw, **{length: 4})
    hp, key = _hp(lr=0.2, wd=1e-3), jax.random.key(5)
    full = jax.jit(make_run(long))(hp, key)
    first = jax.jit(make_run(short))(hp, key)
    rest = jax.jit(make_run(long, start=4))(hp, key, None, first["final_state"])
    for n in ("loss", "rho", "grad_cos", "rank", "sharpness"):
        np.testing.assert_allclose(
            np.concatenate([first[n], rest[n]]), full[n], rtol=2e-6, atol=1e-7, err_msg=n
        )
    with pytest.raises(ValueError, match="start"):
        make_run(long, start=3)


# --------------------------------------------------------------------------- train margins


def test_train_margins_are_taken_on_each_minibatch_before_its_step():
    spec = RunSpec(
        BN,
        DATA,
        loss="square",
        steps=3,
        record_every=3,
        batch=10,
        sampling="permutation",
        observables=("train_margins",),
        stepper=functools.partial(steps.sgd, momentum="heavy_ball"),
    )
    hp, key = _hp(lr=0.1, mu=0.9), jax.random.key(2)
    tr = jax.jit(make_run(spec))(hp, key)
    k_init, k_data = jax.random.split(key)
    params, state = BN.init(k_init), models.init_state(BN)
    stepper = spec.stepper(train.make_loss_fn(BN, "square"))
    st = stepper.init_fn(params)
    ms = []
    for t in range(1, 4):
        idx = jax.random.permutation(jax.random.fold_in(k_data, t), N)[:10]
        b = Batch(DATA.x_train[idx], DATA.y_train[idx], jnp.full((10,), 0.1), state)
        f = models.forward(BN, st.params, state, b.x, train=True)
        ms.append(np.asarray(obs.margins(f.y, b.y, obs.rho_eff(st.params, f.state))))
        st, info = stepper.step_fn(st, b, hp)
        state = info.model_state
    ms = np.concatenate(ms)
    np.testing.assert_allclose(tr["train_margin_mean"][1], ms.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tr["train_margin_std"][1], ms.std(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(tr["train_margin_min"][1], ms.min(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- precision


def test_half_precision_compute_keeps_float32_master_weights():
    spec = RunSpec(
        models.mlp((D, 16, C), norm="batch"),
        DATA,
        loss="cross_entropy",
        steps=20,
        record_every=10,
        batch=16,
        observables=("loss", "rho"),
        precision="bfloat16",
        keep_state=True,
    )
    tr = jax.jit(make_run(spec))(_hp(lr=0.2), jax.random.key(0))
    assert tr["final_state"].state.params[0]["w"].dtype == jnp.float32
    assert float(tr["loss"][-1]) < float(tr["loss"][0])
    loss_fn = train.make_loss_fn(spec.model, "cross_entropy", "bfloat16")
    params = spec.model.init(jax.random.key(0))
    b = Batch(jnp.asarray(DATA.x_train[:8]), jnp.asarray(DATA.y_train[:8]), jnp.full((8,), 1 / 8))
    _, g, _ = steps.loss_and_grad(loss_fn, params, b)
    assert g[0]["w"].dtype == jnp.float32
    # bfloat16 rounding shows in the loss (so the cast is real)
    exact = steps.loss_value(train.make_loss_fn(spec.model, "cross_entropy"), params, b)
    half = steps.loss_value(loss_fn, params, b)
    assert 1e-5 < abs(float(half) - float(exact)) < 5e-2


def test_channel_norm_forms():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16)) * 3 + 1
    d = x - x.mean(-1, keepdims=True)
    np.testing.assert_allclose(
        norms.channel_norm(x, form="var_unbiased"),
        d / jnp.sqrt(jnp.var(x, -1, keepdims=True, ddof=1) + 1e-5),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        norms.channel_norm(x, form="var"),
        d / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5),
        rtol=1e-5,
    )
    # a constant channel: gain bounded by 1/sqrt(eps) inside the root, 1/eps outside
    c = jnp.zeros((1, 1, 8)).at[0, 0, 0].set(1e-4)
    assert float(jnp.abs(norms.channel_norm(c, form="var_unbiased")).max()) < 0.05
    assert float(jnp.abs(norms.channel_norm(c, form="std")).max()) > 1.0


def test_state_observables_can_read_the_initial_parameters():
    """RecordContext.init_params() is the run's initialization (recomputed from its key): the
    relative distance from it is 0 at step 0 and equals a hand computation at the end."""
    moved = dyn.Observable(
        "moved",
        lambda ctx: jnp.stack(
            [
                jnp.linalg.norm(p["w"] - q["w"]) / jnp.linalg.norm(q["w"])
                for p, q in zip(ctx.params, ctx.init_params(), strict=True)
            ]
        ),
        dims=("layer",),
    )
    spec = RunSpec(
        models.mlp((D, 8, C)),
        DATA,
        loss="cross_entropy",
        steps=6,
        record_every=3,
        batch=8,
        observables=(moved,),
        keep_state=True,
    )
    hp, key = _hp(lr=0.3, wd=0.0), jax.random.key(9)
    tr = jax.jit(make_run(spec))(train.as_hparams(hp._replace(init_scale=2.0)), key)
    p0 = models.scale_weights(spec.model.init(jax.random.split(key)[0]), 2.0)
    p1 = tr["final_state"].state.params
    want = [
        float(jnp.linalg.norm(a["w"] - b["w"]) / jnp.linalg.norm(b["w"]))
        for a, b in zip(p1, p0, strict=True)
    ]
    np.testing.assert_allclose(tr["moved"][0], 0.0, atol=1e-7)
    np.testing.assert_allclose(tr["moved"][-1], want, rtol=1e-5)


def test_step_observable_reductions_and_equality():
    t = lambda ctx: ctx.t.astype(jnp.float32)  # noqa: E731
    obs_ = [dyn.Observable(f"t_{r}", t, kind="step", reduce=r) for r in ("first", "last", "sum")]
    spec = RunSpec(
        models.mlp((D, 8, C)),
        DATA,
        loss="cross_entropy",
        steps=6,
        record_every=3,
        batch=8,
        observables=tuple(obs_),
    )
    tr = jax.jit(make_run(spec))(_hp(), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(tr["t_first"][1:]), [1, 4])
    np.testing.assert_array_equal(np.asarray(tr["t_last"][1:]), [3, 6])
    np.testing.assert_array_equal(np.asarray(tr["t_sum"][1:]), [6, 15])
    # built twice (e.g. once per static point of a sweep), an Observable is the same observable
    again = dyn.Observable("t_first", lambda ctx: ctx.t, kind="step", reduce="first")
    assert again == obs_[0] and hash(again) == hash(obs_[0])
    assert again != obs_[1]


def test_data_transform_gives_each_run_its_own_draw():
    """A fresh noise input per run (from its key): runs of different keys fit different inputs,
    the same key the same one; the transform sees the run's hyperparameters too."""

    def fresh_input(key, data, hp):
        return data._replace(
            x_train=jax.random.uniform(key, data.x_train.shape) * hp.init_scale,
            x_eval=jax.random.uniform(key, data.x_eval.shape) * hp.init_scale,
        )

    seen = dyn.Observable("x0", lambda ctx: ctx.data.x_train[0, 0])
    spec = RunSpec(
        models.mlp((D, 8, C)),
        DATA,
        loss="cross_entropy",
        steps=2,
        record_every=1,
        batch=8,
        observables=(seen,),
        data_transform=fresh_input,
    )
    run = jax.jit(make_run(spec))
    a, b = run(_hp(), jax.random.key(0)), run(_hp(), jax.random.key(1))
    again = run(_hp(), jax.random.key(0))
    want = jax.random.uniform(jax.random.fold_in(jax.random.key(0), 13), DATA.x_train.shape)
    np.testing.assert_allclose(a["x0"], float(want[0, 0]), rtol=1e-6)
    assert float(a["x0"][0]) != float(b["x0"][0]) and float(a["x0"][0]) == float(again["x0"][0])


def test_pytorch_biases_under_any_weight_init():
    m = models.cnn((1, 8, 8), (4,), 3, bias=True, init="frobenius", bias_init="pytorch")
    p = m.init(jax.random.key(0))
    assert float(jnp.linalg.norm(p[0]["w"])) == pytest.approx(1.0, rel=1e-5)
    b = np.asarray(p[0]["b"])
    assert np.abs(b).max() <= 1 / 3 and np.abs(b).max() > 0  # U(+-1/sqrt(1*3*3))
    assert not np.asarray(
        models.cnn((1, 8, 8), (4,), 3, bias=True).init(jax.random.key(0))[0]["b"]
    ).any()
    with pytest.raises(ValueError, match="bias_init"):
        models.mlp((3, 2), bias=True, bias_init="ones")


def test_batch_norm_refuses_a_last_batch_of_one_example():
    spec = RunSpec(
        BN, DATA, loss="cross_entropy", epochs=2, record_every=1, batch=29
    )  # 30 = 29 + 1
    with pytest.raises(ValueError, match="last batch of one example"):
        spec.validate()
    RunSpec(BN, DATA, loss="cross_entropy", epochs=2, record_every=1, batch=28).validate()


def test_float64_runs_keep_float64_records():
    """precision="float64" computes and records in double, every observable included (the
    float32 CPU kernels step aside); run in a subprocess, which enables x64."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import jax; jax.config.update("jax_enable_x64", True)
        import numpy as np, dynamics as dyn
        d = dyn.data.digits(seed=0, n_train=100)
        spec = dyn.RunSpec(dyn.mlp((64, 16, 10)), d, loss="cross_entropy", steps=10,
            record_every=5, batch=20, precision="float64", observables=("loss", "rho", "rank",
            "batch_loss", "grad_corr", "grad_norm", "sharpness", "update_size"))
        tr = jax.jit(dyn.make_run(spec))(dyn.Hparams(lr=0.1), jax.random.key(0))
        bad = [k for k, v in tr.items() if v.dtype.kind == "f" and k != "epoch"
               and v.dtype != np.float64]
        assert not bad and (np.asarray(tr["status"]) == 0), bad
        assert np.isfinite(np.asarray(tr["loss"])).all()
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
