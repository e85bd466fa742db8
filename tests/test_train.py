"""Tests for dynamics.train.make_run: recorded values against a step-by-step reference, GD
against its closed form, full-batch SGD against GD, bucketing against masking, vmapped against
single runs, no recompilation for new hyperparameters, divergence handling, record schedule.

Compiled runs are shared through module-scoped fixtures: each spec compiles once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dynamics import losses, models, steps, train
from dynamics import observables as obs
from dynamics.data import Dataset
from dynamics.steps import Batch, Hparams
from dynamics.train import RunSpec, make_run

N_TRAIN, D, C = 24, 5, 3
STEPS, EVERY, SLOW = 12, 3, 2
RECORDS = np.arange(0, STEPS + 1, EVERY)


def _dataset(seed=0, n=N_TRAIN):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(C, D))
    y = rng.integers(0, C, n + 8).astype(np.int32)
    x = (means[y] + rng.normal(size=(n + 8, D))).astype(np.float32)
    return Dataset(x[:n], y[:n], x[n:], y[n:], C, "toy")


DATA = _dataset()
MODEL = models.mlp((D, 8, C))


def _hp(lr, wd=0.0, bs=0, mu=0.0, scale=1.0):
    return train.as_hparams(Hparams(lr, wd, bs, mu, scale))


def _stack(hps):
    return jax.tree.map(lambda *v: jnp.stack(v), *hps)


def _lane(tree, i):
    return {k: v[i] for k, v in tree.items()}


def _assert_traces_close(a, b, rtol=1e-5, atol=1e-6, names=None):
    names = names or [n for n in a if n not in ("status", "diverged_step")]
    for n in names:
        np.testing.assert_allclose(
            np.asarray(a[n]), np.asarray(b[n]), rtol=rtol, atol=atol, err_msg=n
        )


# --------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(record_every=5), "record_every"),
        (dict(slow_every=3), "slow_every"),
        (dict(sampling="bootstrap"), "sampling"),
        (dict(sampling="permutation", batch=N_TRAIN + 1), "batch"),
        (dict(batch=0), "batch"),
        (dict(steps=0), "steps"),
        (dict(observables=("loss", "nope")), "nope"),
        (dict(spectrum_method="qr"), "spectrum_method"),
        (dict(model=models.Model(MODEL.init, MODEL.apply), observables=("nc",)), "neural collapse"),
    ],
)
def test_invalid_specs_raise(change, field):
    kwargs = dict(model=MODEL, data=DATA, steps=STEPS, record_every=EVERY, batch=8)
    spec = RunSpec(**{**kwargs, **change})
    with pytest.raises(ValueError, match=field):
        make_run(spec)


def test_resolve_observables_and_describe():
    names = train.resolve_observables(("loss", "spectrum", "loss", "grad_corr"))
    assert names == ("loss", "sv", "rank", "stable_rank") + train.ALIASES["grad_corr"]
    spec = RunSpec(MODEL, DATA, observables=("loss", "sv", "grad_norm"))
    dims = train.describe(spec)
    assert dims["sv"] == ("step", "layer", "sv_index")
    assert dims["grad_norm"] == ("step", "layer") and dims["loss"] == ("step",)
    assert dims["status"] == () and dims["diverged_step"] == ()


# --------------------------------------------------------------------------- recorded values

FULL_OBS = (
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "rho",
    "layer_norm",
    "effective_lr",
    "balancedness",
    "margins",
    "spectrum",
    "sharpness",
    "nc",
    "batch_loss",
    "grad_norm",
    "grad_corr",
    "update_size",
)


@pytest.fixture(scope="module")
def full_gd():
    """A full-batch run recording every observable, and its trace."""
    spec = RunSpec(
        MODEL,
        DATA,
        loss="square",
        stepper=functools.partial(steps.sgd, momentum="heavy_ball"),
        steps=STEPS,
        record_every=EVERY,
        slow_every=SLOW,
        sampling="full",
        observables=FULL_OBS,
        eval_size=None,
        sharpness_iters=100,
    )
    hp = _hp(0.05, wd=0.01, mu=0.5, scale=1.1)
    key = jax.random.key(3)
    return spec, hp, key, jax.jit(make_run(spec))(hp, key)


def _reference(spec, hp, key):
    """Step-by-step replay with the stepper and observables called directly."""
    loss_fn = train.make_loss_fn(spec.model, "square")
    stepper = spec.stepper(loss_fn)
    k_init, _ = jax.random.split(key)  # make_run: an initialization key and a data-order key
    params = models.scale_weights(spec.model.init(k_init), hp.init_scale)
    x, y = jnp.asarray(DATA.x_train), jnp.asarray(DATA.y_train)
    batch = Batch(x, y, jnp.full((N_TRAIN,), 1.0 / N_TRAIN, jnp.float32))
    step = jax.jit(lambda s: stepper.step_fn(s, batch, hp))

    @jax.jit
    def observe(params):
        pred, h = spec.model.apply_features(params, x)
        r = obs.rho(params)
        m = obs.margins(pred, y, r)
        sv = obs.singular_values(params)
        test_pred = spec.model.apply(params, jnp.asarray(DATA.x_test))
        out = dict(
            loss=losses.square_loss(pred, y),
            accuracy=losses.accuracy(pred, y),
            test_loss=losses.square_loss(test_pred, jnp.asarray(DATA.y_test)),
            test_accuracy=losses.accuracy(test_pred, jnp.asarray(DATA.y_test)),
            rho=r,
            layer_norm=obs.layer_norms(params),
            effective_lr=obs.effective_lr(hp.lr, params),
            balancedness=obs.balancedness(params),
            margin_mean=jnp.mean(m),
            margin_std=jnp.std(m),
            margin_min=jnp.min(m),
            sv=sv,
            rank=obs.numerical_rank(sv, spec.rank_tol),
            stable_rank=obs.stable_rank(sv),
        )
        out.update(obs.neural_collapse(h, y, params[-1]["w"], pred, C))
        return out

    @jax.jit
    def hessian_top(params):
        flat, unravel = ravel_pytree(params)
        H = jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)
        ev = jnp.linalg.eigvalsh(H)
        return ev[jnp.argmax(jnp.abs(ev))]

    state = stepper.init_fn(params)
    records = [observe(params)]
    tops = [hessian_top(params)]
    per_step = []  # (loss, grads, update sizes) of steps 1..T
    prev = state.params
    for _ in range(STEPS):
        state, info = step(state)
        per_step.append((info.loss, info.grads, obs.update_sizes(prev, state.params, hp.lr)))
        prev = state.params
        if len(per_step) % EVERY == 0:
            records.append(observe(state.params))
            tops.append(hessian_top(state.params))
    return records, tops, per_step


def test_recorded_values_match_step_by_step_reference(full_gd):
    spec, hp, key, trace = full_gd
    records, tops, per_step = _reference(spec, hp, key)
    n_rec = len(RECORDS)
    assert int(trace["status"]) == 0 and int(trace["diverged_step"]) == -1
    costly = {"sv", "rank", "stable_rank", "sharpness", *obs.NC_NAMES}
    for name in train.resolve_observables(FULL_OBS):
        assert trace[name].shape[0] == n_rec, name
        if name not in records[0]:
            continue
        for r in range(n_rec):
            got = np.asarray(trace[name][r])
            if name in costly and r % SLOW:
                assert np.isnan(got).all(), (name, r)
                continue
            want = np.asarray(records[r][name])
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5, err_msg=f"{name} {r}")
    for r in range(0, n_rec, SLOW):
        assert float(trace["sharpness"][r]) == pytest.approx(float(tops[r]), rel=1e-3)
    # per-step statistics: NaN at step 0, then means over the steps of each interval
    for name in ("batch_loss", "grad_norm", "update_size", *train.ALIASES["grad_corr"]):
        assert np.isnan(np.asarray(trace[name][0])).all(), name
    for r in range(1, n_rec):
        idx = range((r - 1) * EVERY, r * EVERY)  # steps (r-1)r+1 .. r*EVERY, 0-based
        want_loss = np.mean([float(per_step[i][0]) for i in idx])
        assert float(trace["batch_loss"][r]) == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(
            trace["grad_norm"][r], obs.grad_norms(per_step[idx[-1]][1]), rtol=1e-5
        )
        upd = np.mean([np.asarray(per_step[i][2]) for i in idx], axis=0)
        np.testing.assert_allclose(trace["update_size"][r], upd, rtol=1e-4)
        pairs = [i for i in idx if i >= 1]  # a pair needs the previous step's gradient
        cos = [obs.grad_cosines(per_step[i - 1][1], per_step[i][1]) for i in pairs]
        per = np.array([np.asarray(c[0]) for c in cos])
        whole = np.array([float(c[1]) for c in cos])
        np.testing.assert_allclose(trace["grad_cos"][r], per.mean(axis=0), rtol=1e-4, atol=1e-6)
        assert float(trace["grad_cos_global"][r]) == pytest.approx(whole.mean(), rel=1e-4)
        np.testing.assert_allclose(trace["grad_cos_neg_frac"][r], (per < 0).mean(axis=0))
        assert float(trace["grad_cos_neg_frac_global"][r]) == pytest.approx((whole < 0).mean())


def _perm_spec(batch):
    return RunSpec(
        MODEL,
        DATA,
        loss="square",
        stepper=functools.partial(steps.sgd, momentum="heavy_ball"),
        steps=STEPS,
        record_every=EVERY,
        sampling="permutation",
        batch=batch,
        observables=("loss", "batch_loss", "rho"),
        eval_size=None,
    )


@pytest.fixture(scope="module")
def perm_run():
    """Sampling without replacement with a static batch of the whole training set."""
    return jax.jit(make_run(_perm_spec(N_TRAIN)))


def test_full_batch_sgd_equals_gd(full_gd, perm_run):
    _, hp, key, trace = full_gd
    sgd = perm_run(hp._replace(batch_size=jnp.int32(N_TRAIN)), key)
    _assert_traces_close(sgd, trace, rtol=1e-5, names=["loss", "batch_loss", "rho"])
    # a smaller true batch is a different run (the check can fail)
    other = perm_run(hp._replace(batch_size=jnp.int32(N_TRAIN - 4)), key)
    assert not np.allclose(other["batch_loss"][1:], trace["batch_loss"][1:], rtol=1e-4)


def test_permutation_bucketing_equals_masking(perm_run):
    # the first b entries of a permutation of the n indices do not depend on the static batch
    hp = _hp(0.1, 1e-3, 6, 0.5)
    key = jax.random.key(11)
    small = jax.jit(make_run(_perm_spec(6)))(hp, key)
    _assert_traces_close(small, perm_run(hp, key))


def test_gd_loss_trace_equals_closed_form():
    # linear model from W_0 = 0 (init_scale 0), square loss on one-hot labels:
    # W_t = W* + (W_0 - W*)(I - lr H)^t with H = (2/(nC)) X^T X.
    lr = 0.1
    spec = RunSpec(
        models.mlp((D, C), activation="linear"),
        DATA,
        steps=20,
        record_every=4,
        sampling="full",
        observables=("loss", "rho"),
        eval_size=None,
    )
    trace = jax.jit(make_run(spec))(_hp(lr, scale=0.0), jax.random.key(0))
    X, E = DATA.x_train.astype(np.float64), np.eye(C)[DATA.y_train]
    H = 2.0 / (N_TRAIN * C) * X.T @ X
    w_star = np.linalg.solve(X.T @ X, X.T @ E)  # (D, C): W* = w_star.T
    A = np.eye(D) - lr * H
    for r, t in enumerate(spec.record_steps()):
        w = w_star - np.linalg.matrix_power(A, t) @ w_star  # W_0 = 0
        loss = np.mean((X @ w - E) ** 2)
        assert float(trace["loss"][r]) == pytest.approx(loss, rel=1e-5)
        assert float(trace["rho"][r]) == pytest.approx(np.linalg.norm(w), rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- vmapped runs

SGD_OBS = ("loss", "batch_loss", "grad_norm", "update_size", "grad_cos", "rank", "stable_rank")


def _sgd_spec(batch, sampling="replacement"):
    return RunSpec(
        MODEL,
        DATA,
        loss="square",
        stepper=functools.partial(steps.sgd, momentum="heavy_ball"),
        steps=STEPS,
        record_every=EVERY,
        slow_every=SLOW,
        batch=batch,
        sampling=sampling,
        observables=SGD_OBS,
    )


@pytest.fixture(scope="module")
def sgd_runs():
    """jit(vmap(run)) with a trace counter, and jit(run), for one minibatch spec."""
    run = make_run(_sgd_spec(8))
    traces = {"vmap": 0, "single": 0}

    def counted(kind):
        def f(hp, key):
            traces[kind] += 1
            return run(hp, key)

        return f

    return jax.jit(jax.vmap(counted("vmap"))), jax.jit(counted("single")), traces


HPS_A = [_hp(0.05, 0.0, 8, 0.0), _hp(0.1, 1e-3, 4, 0.5), _hp(0.05, 1e-2, 2, 0.9)]
HPS_B = [_hp(0.1, 0.0, 6, 0.1), _hp(50.0, 0.0, 8, 0.0), _hp(0.05, 1e-3, 3, 0.5)]
KEYS = jax.random.split(jax.random.key(7), 3)


def test_vmapped_runs_equal_single_runs(sgd_runs):
    vrun, srun, _ = sgd_runs
    batched = vrun(_stack(HPS_A), KEYS)
    for i, hp in enumerate(HPS_A):
        single = srun(hp, KEYS[i])
        _assert_traces_close(_lane(batched, i), single, rtol=1e-5)
        assert int(batched["status"][i]) == 0
    # the runs differ (batch size, lr, momentum are really used)
    assert not np.allclose(batched["loss"][0], batched["loss"][1])


def test_new_hyperparameters_do_not_recompile(sgd_runs):
    vrun, srun, traces = sgd_runs
    vrun(_stack(HPS_A), KEYS)
    before = dict(traces)
    vrun(_stack(HPS_B), KEYS)
    vrun(_stack(HPS_A[::-1]), jax.random.split(jax.random.key(8), 3))
    for hp in HPS_B:
        srun(hp, KEYS[0])
    assert traces["vmap"] == before["vmap"] == 1
    assert traces["single"] == 1
    assert vrun._cache_size() == 1 and srun._cache_size() == 1


def test_divergence_is_flagged_and_isolated(sgd_runs):
    vrun, srun, _ = sgd_runs
    batched = vrun(_stack(HPS_B), KEYS)
    status = np.asarray(batched["status"])
    div = np.asarray(batched["diverged_step"])
    assert status.tolist() == [0, 1, 0]
    assert div[0] == -1 and div[2] == -1 and 0 < div[1] <= STEPS
    # records before the flagged step are kept (the evaluation loss of the last one may
    # already overflow: the flag comes from the batch loss and the parameters); from it on, NaN.
    loss = np.asarray(batched["loss"][1])
    assert np.isfinite(loss[0]) and not np.isnan(loss[RECORDS < div[1]]).any()
    for name in SGD_OBS:
        v = np.asarray(batched[name][1])
        assert np.isnan(v[RECORDS >= div[1]]).all(), name
    # neighbours in the same vmap get the numbers they get alone
    for i in (0, 2):
        single = srun(HPS_B[i], KEYS[i])
        _assert_traces_close(_lane(batched, i), single, rtol=1e-5)
        assert np.isfinite(np.asarray(single["loss"])).all()


def test_record_schedule(sgd_runs):
    vrun, _, _ = sgd_runs
    trace = vrun(_stack(HPS_A), KEYS)
    for name in ("batch_loss", "grad_norm", "update_size", "grad_cos"):
        assert np.isnan(np.asarray(trace[name][:, 0])).all(), name
        assert np.isfinite(np.asarray(trace[name][:, 1:])).all(), name
    for name in ("rank", "stable_rank"):  # costly: step 0 and every SLOW-th record only
        v = np.asarray(trace[name])
        assert v.shape == (3, len(RECORDS), 2)
        slow = np.arange(len(RECORDS)) % SLOW == 0
        assert np.isfinite(v[:, slow]).all(), name
        assert np.isnan(v[:, ~slow]).all(), name
    assert np.isfinite(np.asarray(trace["loss"])).all()


def test_bucketing_equals_masking(sgd_runs):
    # batch=4 with hp.batch_size=4 (a bucket) vs batch=8 with hp.batch_size=4 (masked):
    # indices are drawn one per slot, so the first 4 slots hold the same examples.
    _, srun, _ = sgd_runs
    hp = _hp(0.1, 1e-3, 4, 0.5)
    small = jax.jit(make_run(_sgd_spec(4)))(hp, KEYS[1])
    masked = srun(hp, KEYS[1])
    _assert_traces_close(small, masked, rtol=1e-5)
    # a different true batch size gives a different run (the check can fail)
    other = srun(hp._replace(batch_size=jnp.int32(5)), KEYS[1])
    assert not np.allclose(other["loss"], masked["loss"])


def _first_bad_step(spec, hp, key):
    """Step-by-step reference for full-batch GD: the first step whose loss (at the old
    parameters) or whose updated parameters are non-finite; -1 if none."""
    loss_fn = train.make_loss_fn(spec.model, spec.loss)
    stepper = spec.stepper(loss_fn)
    k_init, _ = jax.random.split(key)
    state = stepper.init_fn(models.scale_weights(spec.model.init(k_init), hp.init_scale))
    n = spec.data.x_train.shape[0]
    batch = Batch(
        jnp.asarray(spec.data.x_train), jnp.asarray(spec.data.y_train), jnp.full((n,), 1.0 / n)
    )
    step = jax.jit(stepper.step_fn)
    for t in range(1, spec.steps + 1):
        new, info = step(state, batch, hp)
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new.params))
        if not (bool(jnp.isfinite(info.loss)) and finite):
            return t
        state = new
    return -1


@pytest.mark.parametrize(
    "lr,what",
    [
        (3e38, "the first update overflows while its loss is finite"),
        (40.0, "the loss blows up over several steps"),
        (0.05, "no divergence"),
    ],
)
def test_diverged_step_matches_a_step_by_step_reference(lr, what):
    spec = RunSpec(
        model=MODEL,
        data=DATA,
        loss="square",
        steps=STEPS,
        record_every=EVERY,
        sampling="full",
        observables=("loss", "rho", "rank"),
    )
    hp, key = _hp(lr), jax.random.key(3)
    trace = jax.jit(make_run(spec))(hp, key)
    want = _first_bad_step(spec, hp, key)
    assert int(trace["diverged_step"]) == want, what
    assert int(trace["status"]) == (want > 0)
    if want > 0:
        # records from the record at or after the flagged step on are NaN, earlier ones are not
        for name in ("rho", "rank"):
            v = np.asarray(trace[name])
            v = v.reshape(v.shape[0], -1)
            assert np.isnan(v[RECORDS >= want]).all() and not np.isnan(v[RECORDS < want]).any()


def _blow_up_at(step_no):
    """GD whose step `step_no` takes a learning rate of 3e38: its update overflows while the
    loss it was computed from is finite."""

    def factory(loss_fn):
        def init_fn(params):
            return steps.TrainState(params, jnp.zeros((), jnp.int32))

        def step_fn(state, batch, hp):
            loss, g = jax.value_and_grad(loss_fn)(state.params, batch)
            t = state.opt_state + 1
            lr = jnp.where(t == step_no, 3e38, hp.lr)
            params = jax.tree.map(lambda w, d: w - lr * d, state.params, g)
            return steps.TrainState(params, t), steps.StepInfo(loss, g)

        return steps.Stepper(init_fn, step_fn)

    return factory


@pytest.mark.parametrize("step_no", [EVERY, EVERY + 1, STEPS])
def test_divergence_from_one_overflowing_update(step_no):
    # at a record step (only the record's parameter check sees it), just after one (the next
    # loss sees it), and at the last step of the run
    spec = RunSpec(
        model=MODEL,
        data=DATA,
        loss="square",
        stepper=_blow_up_at(step_no),
        steps=STEPS,
        record_every=EVERY,
        sampling="full",
        observables=("loss", "rho"),
    )
    hp, key = _hp(0.01), jax.random.key(0)
    trace = jax.jit(make_run(spec))(hp, key)
    assert _first_bad_step(spec, hp, key) == step_no
    assert int(trace["diverged_step"]) == step_no and int(trace["status"]) == 1
    rho = np.asarray(trace["rho"])
    assert np.isnan(rho[RECORDS >= step_no]).all() and np.isfinite(rho[RECORDS < step_no]).all()
