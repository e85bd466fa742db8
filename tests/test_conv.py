"""Every convolution formulation (dynamics.conv) gives the reference numbers: a float64 direct
sum for the reference itself, lax.conv_general_dilated for each formulation, to float32
rounding; outputs, gradients and Hessian-vector products, under vmap and jit, through the
models; the platform choice (CPU form on the CPU, XLA's convolution for accelerators)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import conv
from dynamics import models as _models

FORMS = conv.FORMULATIONS

# (x shape (B, C, *spatial), w shape (O, C, *kernel), stride, padding): 1-D and 2-D, strides,
# paddings, odd and even kernels and maps, one and several channels, the models' shapes
CASES = [
    ((2, 1, 16), (1, 1, 15), 1, "circular"),  # linear_conv1d: 15 taps, one channel
    ((2, 2, 11), (3, 2, 15), 2, "circular"),
    ((3, 1, 9), (2, 1, 4), 1, "zero"),  # even kernel: SAME pads 1 before, 2 after
    ((2, 4, 10), (4, 4, 3), 1, "circular"),  # the 4-channel decoder's
    ((2, 3, 12), (5, 3, 3), 3, "valid"),
    ((2, 2, 7), (1, 2, 2), 2, "zero"),
    ((2, 1, 16, 16), (4, 1, 3, 3), 2, "zero"),  # the conv grid's first layer
    ((2, 3, 8, 8), (5, 3, 3, 3), 2, "zero"),
    ((2, 3, 7, 6), (2, 3, 3, 2), 1, "zero"),
    ((1, 2, 9, 9), (3, 2, 3, 3), 2, "valid"),
    ((2, 2, 6, 7), (3, 2, 3, 3), 1, "circular"),
    ((2, 1, 5, 5), (1, 1, 3, 3), 2, "circular"),
    ((2, 3, 6, 6), (4, 3, 1, 1), 2, "zero"),  # strided 1x1
    ((2, 3, 5), (2, 3, 1), 1, "circular"),  # 1x1, stride 1: the channel contraction
    ((3, 4, 2, 2), (6, 4, 3, 3), 2, "zero"),  # 2x2 map, stride 2: 5 of 9 taps see only zeros
    ((2, 2, 1), (3, 2, 3), 1, "zero"),  # one position: only the middle tap meets the input
]
IDS = [
    f"{len(x) - 2}d-c{x[1]}-o{w[0]}-k{'x'.join(map(str, w[2:]))}-s{s}-{p}" for x, w, s, p in CASES
]


def _arrays(x_shape, w_shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)


def _direct64(x, w, stride, padding):
    """y[b, o, i] = sum_{c, t} w[o, c, t] x_pad[b, c, stride i + t] in float64, by loops over
    the output positions (the module docstring's padding rules written out again)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    kernel, spatial = w.shape[2:], x.shape[2:]
    widths = [(0, 0), (0, 0)]
    out = []
    for n, k in zip(spatial, kernel, strict=True):
        if padding == "valid":
            o, lo, hi = (n - k) // stride + 1, 0, 0
        elif padding == "circular":
            o, lo, hi = -(-n // stride), (k - 1) // 2, k - 1 - (k - 1) // 2
        else:
            o = -(-n // stride)
            tot = max((o - 1) * stride + k - n, 0)
            lo, hi = tot // 2, tot - tot // 2
        out.append(o)
        widths.append((lo, hi))
    xp = np.pad(x, widths, mode="wrap" if padding == "circular" else "constant")
    y = np.zeros((x.shape[0], w.shape[0], *out))
    axes = list(range(1, w.ndim))  # channels and taps
    for i in itertools.product(*[range(o) for o in out]):
        window = tuple(slice(s * stride, s * stride + k) for s, k in zip(i, kernel, strict=True))
        patch = xp[(slice(None), slice(None), *window)]  # (B, C, *kernel)
        y[(slice(None), slice(None), *i)] = np.tensordot(patch, w, axes=(axes, axes))
    return y


def _close(a, b, scale=1.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_the_direct_sum(case):
    x_shape, w_shape, s, p = case
    x, w = _arrays(x_shape, w_shape)
    ref = _direct64(x, w, s, p)
    got = jax.jit(conv.conv_xla, static_argnums=(2, 3))(x, w, s, p)
    assert got.shape == ref.shape
    _close(got, ref, np.abs(ref).max())


ALL = (*FORMS, "auto")


def _per_form(fn):
    """One jitted function returning fn(form) for every formulation (one compile per case)."""
    return jax.jit(lambda *args: {form: fn(form)(*args) for form in ALL})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_formulation_gives_the_reference_and_its_gradients(case):
    x_shape, w_shape, s, p = case
    x, w = _arrays(x_shape, w_shape)
    ref = conv.conv_xla(x, w, s, p)
    r = jax.random.normal(jax.random.key(7), ref.shape)

    def value_and_grads(form):
        def f(x, w):
            return jnp.sum(r * jnp.tanh(conv.conv(x, w, s, p, formulation=form)))

        return lambda x, w: (conv.conv(x, w, s, p, formulation=form), jax.grad(f, (0, 1))(x, w))

    got = _per_form(value_and_grads)(x, w)
    _, g_ref = got["xla"]
    for form, (y, g) in got.items():
        assert y.shape == ref.shape, form
        _close(y, ref, np.abs(ref).max())
        for a, b in zip(g, g_ref, strict=True):
            _close(a, b, np.abs(b).max())


HVP_CASES = [CASES[i] for i in (0, 2, 3, 6, 8, 10)]


@pytest.mark.parametrize("case", HVP_CASES, ids=[IDS[CASES.index(c)] for c in HVP_CASES])
def test_hessian_vector_products_match(case):
    """Forward over reverse (the sharpness observable's HVP) through every formulation."""
    x_shape, w_shape, s, p = case
    x, w = _arrays(x_shape, w_shape)
    v = jax.random.normal(jax.random.key(3), w.shape)

    def hvp(form):
        def f(w):
            return jnp.sum(jnp.tanh(conv.conv(x, w, s, p, formulation=form)) ** 2)

        return lambda w: jax.jvp(jax.grad(f), (w,), (v,))[1]

    got = _per_form(hvp)(w)
    for h in got.values():
        _close(h, got["xla"], np.abs(got["xla"]).max())


VMAP_CASES = [CASES[i] for i in (1, 3, 7, 10)]


@pytest.mark.parametrize("case", VMAP_CASES, ids=[IDS[CASES.index(c)] for c in VMAP_CASES])
def test_vmapped_over_runs_matches_run_by_run(case):
    """Runs with their own kernels and inputs (the sweep's run axis): values and gradients."""
    x_shape, w_shape, s, p = case
    n = 3
    xs = jax.random.normal(jax.random.key(1), (n, *x_shape))
    ws = jax.random.normal(jax.random.key(2), (n, *w_shape))

    def value_and_grads(form):
        def f(x, w):
            return jnp.sum(jnp.sin(conv.conv(x, w, s, p, formulation=form)))

        return jax.vmap(
            lambda x, w: (conv.conv(x, w, s, p, formulation=form), jax.grad(f, (0, 1))(x, w))
        )

    got = _per_form(value_and_grads)(xs, ws)

    @jax.jit
    def one_by_one(xs, ws):
        def f(x, w):
            return jnp.sum(jnp.sin(conv.conv_xla(x, w, s, p)))

        return [
            (conv.conv_xla(xs[i], ws[i], s, p), jax.grad(f, (0, 1))(xs[i], ws[i])) for i in range(n)
        ]

    for i, (y_ref, g_ref) in enumerate(one_by_one(xs, ws)):
        for y, g in got.values():
            _close(y[i], y_ref, np.abs(y_ref).max())
            for a, b in zip((g[0][i], g[1][i]), g_ref, strict=True):
                _close(a, b, np.abs(b).max())


MODELS = [
    ("cnn-2d-s2", lambda: dyn.cnn((1, 16, 16), (4, 6, 8), 3, stride=2), (3, 256)),
    (
        "cnn-1d-circ",
        lambda: dyn.cnn((2, 15), (3,), 2, kernel=5, stride=2, padding="circular"),
        (2, 2, 15),
    ),
    (
        "cnn-2d-valid-bn",
        lambda: dyn.cnn((3, 8, 8), (4, 5), 4, padding="valid", norm="batch", bias=True),
        (4, 3, 8, 8),
    ),
    (
        "linear_conv1d",
        lambda: dyn.linear_conv1d(3, kernel=15, channels=1, head="sigmoid"),
        (2, 1, 32),
    ),
    (
        "deep_decoder-1d",
        lambda: dyn.deep_decoder(4, 3, kernel=3, dim=1, norm="channel"),
        (1, 4, 24),
    ),
    (
        "deep_decoder-2d",
        lambda: dyn.deep_decoder(3, 2, in_channels=2, kernel=3, dim=2, upsample=2),
        (1, 2, 4, 4),
    ),
]


@pytest.mark.parametrize("name,make,x_shape", MODELS, ids=[m[0] for m in MODELS])
def test_models_give_the_same_numbers_in_every_formulation(name, make, x_shape):
    """Outputs and the loss gradient of whole models, traced with each formulation forced."""
    model = make()
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), x_shape)

    def out_and_grad():  # traced anew in each formulation's context
        def loss(p, x):
            y = model.apply(p, x)
            return jnp.sum(jnp.sin(y)), y

        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
        return y, g

    with conv.forced("xla"):
        ref_y, ref_g = out_and_grad()
    for form in (*FORMS, "auto"):
        with conv.forced(form):
            y, g = out_and_grad()
        _close(y, ref_y, np.abs(ref_y).max())
        # the scale of the whole gradient: a bias before batch norm has a zero gradient (the
        # norm removes it), rounding noise in each formulation
        scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(ref_g))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
            _close(a, b, scale)


def _lowered_text(f, *args, platform):
    exp = jax.export.export(jax.jit(f), platforms=[platform])(*args)
    return exp.mlir_module()


def test_cpu_programs_use_the_cpu_form_and_accelerators_xla_s_convolution():
    x, w = _arrays((2, 4, 8, 8), (8, 4, 3, 3))
    assert conv.choose(x.shape, w.shape, 2, "zero") == "patches"
    f = lambda x, w: conv.conv(x, w, 2, "zero")  # noqa: E731
    cpu = _lowered_text(f, x, w, platform="cpu")
    assert "stablehlo.convolution" not in cpu and "stablehlo.dot_general" in cpu
    for platform in ("cuda", "rocm", "tpu"):
        acc = _lowered_text(f, x, w, platform=platform)
        assert "stablehlo.convolution" in acc, platform
        assert "stablehlo.dot_general" not in acc, platform
    # the same through the gradient
    g = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=1)
    assert "stablehlo.convolution" not in _lowered_text(g, x, w, platform="cpu")
    assert "stablehlo.convolution" in _lowered_text(g, x, w, platform="cuda")


def test_choice_by_shape():
    assert conv.choose((8, 16, 8, 8), (32, 16, 3, 3), 2, "zero") == "patches"
    assert conv.choose((8, 1, 16, 16), (16, 1, 3, 3), 2, "zero") == "patches"
    assert conv.choose((1, 4, 1024), (4, 4, 3), 1, "circular") == "xla"  # few channels
    assert conv.choose((1, 1, 128), (1, 1, 15), 1, "circular") == "xla"  # one channel
    assert conv.choose((1, 8, 1024), (8, 8, 3), 1, "circular") == "xla"  # 1-D, 8 channels
    assert conv.choose((1, 16, 1024), (16, 16, 3), 1, "circular") == "patches"
    assert conv.choose((8, 4, 8, 8), (4, 4, 3, 3), 2, "zero") == "patches"  # 2-D, 4 channels
    assert conv.choose((8, 2, 8, 8), (2, 2, 3, 3), 2, "zero") == "xla"
    x, w = _arrays((1, 4, 16), (4, 4, 3))
    f = lambda x, w: conv.conv(x, w, 1, "circular")  # noqa: E731
    assert "stablehlo.convolution" in _lowered_text(f, x, w, platform="cpu")


def test_forced_formulation_applies_at_trace_time_and_the_environment_variable(monkeypatch):
    x, w = _arrays((2, 3, 8), (4, 3, 3))

    def prims(**kw):
        jaxpr = jax.make_jaxpr(lambda x, w: conv.conv(x, w, 1, "zero", **kw))(x, w)
        return str(jaxpr)

    with conv.forced("xla"):
        assert "conv_general_dilated" in prims()
        assert "conv_general_dilated" not in prims(formulation="patches")  # the argument wins
    with conv.forced("patches"):
        assert "conv_general_dilated" not in prims() and "dot_general" in prims()
    monkeypatch.setenv("DYNAMICS_CONV", "xla")
    assert "conv_general_dilated" in prims()
    monkeypatch.setenv("DYNAMICS_CONV", "nonsense")
    with pytest.raises(ValueError, match="conv formulation"):
        prims()


def test_shape_errors_name_the_field():
    x, w = _arrays((2, 3, 8), (4, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        conv.conv(x, w, 1, "same")
    with pytest.raises(ValueError, match="channels"):
        conv.conv(x, jnp.zeros((4, 2, 3)), 1, "zero")
    with pytest.raises(ValueError, match="spatial axes"):
        conv.conv(x[:, :, :, None], w, 1, "zero")
    with pytest.raises(ValueError, match="stride"):
        conv.conv(x, w, 0, "zero")
    with pytest.raises(ValueError, match="larger than the input"):
        conv.conv(x, jnp.zeros((4, 3, 9)), 1, "valid")
    with pytest.raises(ValueError, match="conv formulation"):
        conv.conv(x, w, 1, "zero", formulation="fft")


def test_models_conv_routes_through_the_module():
    """models._conv is conv.conv times the multiplier plus the bias (no other code path)."""
    x, w = _arrays((2, 3, 9), (4, 3, 5))
    b = jnp.arange(4.0)
    y = _models._conv({"w": w, "b": b}, x, 0.5, 2, "circular")
    _close(y, 0.5 * conv.conv_xla(x, w, 2, "circular") + b[None, :, None], 10.0)
    with conv.forced("xla"):
        jaxpr = str(jax.make_jaxpr(lambda x: _models._conv({"w": w}, x, 1.0, 2, "zero"))(x))
    assert "conv_general_dilated" in jaxpr
