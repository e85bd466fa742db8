"""dynamics.priors (P5) against references: PyTorch's bilinear upsampling (its documented
example and the formula in float64), a numpy float64 forward pass of the authors' decoder,
`dynamics.deep_decoder`, the closed-form Jacobian of the two-layer generator
(`kernels.generator_jacobian`, `kernels.generator_dual_kernel`), numpy's eigh, and the
observables recomputed on the host from a run's kept final state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import kernels, priors

# --------------------------------------------------------------------------- resizing


def test_upsampling_matches_pytorch_documented_example():
    # torch.nn.Upsample(scale_factor=2, mode="bilinear") (align_corners=False), from its docs
    x = jnp.asarray([[[[1.0, 2.0], [3.0, 4.0]]]])
    want = [
        [1.0, 1.25, 1.75, 2.0],
        [1.5, 1.75, 2.25, 2.5],
        [2.5, 2.75, 3.25, 3.5],
        [3.0, 3.25, 3.75, 4.0],
    ]
    np.testing.assert_allclose(priors.upsample_linear(x, (4, 4))[0, 0], want, atol=1e-6)
    # the 1-D example: interpolate(arange(4), scale_factor=2, mode="linear")
    y = priors.upsample_linear(jnp.arange(4.0)[None, None], (8,))[0, 0]
    np.testing.assert_allclose(y, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)


def _torch_linear(x, n_out):
    """PyTorch's upsample_linear1d (align_corners=False) written out per output index."""
    n_in = len(x)
    out = np.empty(n_out)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        lam = src - i0
        out[i] = (1 - lam) * x[i0] + lam * x[i1]
    return out


@pytest.mark.parametrize("n_in,n_out", [(5, 10), (16, 28), (28, 49), (7, 7), (3, 11)])
def test_resize_matrix_and_paths_agree(n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    x = rng.standard_normal(n_in)
    M = priors.linear_resize_matrix(n_in, n_out)
    np.testing.assert_allclose(M @ x, _torch_linear(x, n_out), atol=1e-12)
    np.testing.assert_allclose(M.sum(1), 1.0, atol=1e-12)
    img = rng.standard_normal((2, 3, n_in, n_in + 1)).astype(np.float32)
    size = (n_out, n_out + 1 if n_out == n_in else 2 * (n_in + 1))
    got = np.asarray(priors.upsample_linear(jnp.asarray(img), size))
    ref = np.einsum("oh,bchw,pw->bcop", M, img, priors.linear_resize_matrix(n_in + 1, size[1]))
    np.testing.assert_allclose(got, ref, atol=2e-6)
    jres = jax.image.resize(jnp.asarray(img), img.shape[:2] + size, "linear")
    np.testing.assert_allclose(got, np.asarray(jres), atol=2e-5)


def test_resize_refuses_downsampling():
    with pytest.raises(ValueError, match="n_in <= n_out"):
        priors.linear_resize_matrix(8, 4)


# --------------------------------------------------------------------------- decoder


def test_size_schedules_are_the_authors():
    # printed by compressive_sensing_example_convergence.ipynb for deepdecoder((16,16),(256,256))
    assert priors.geometric_sizes(16, 256, 5) == tuple((s, s) for s in (28, 49, 85, 148, 256))
    assert priors.geometric_sizes(4, 64, 4) == ((8, 8), (16, 16), (32, 32), (64, 64))
    # decodernw([k] * 5) from 16x16: 6 blocks, the last without upsampling (512x512 output)
    assert priors.doubling_sizes(16, 5) == tuple((s, s) for s in (32, 64, 128, 256, 512, 512))
    assert priors.doubling_sizes((32,), 2) == ((64,), (128,), (128,))


def _numpy_decoder(params, x, sizes, eps=1e-5):
    """The authors' decoder in float64: per block conv1x1 -> resize -> relu -> BN over one
    image (biased variance) -> affine; then conv1x1 and sigmoid."""
    h = np.asarray(x, np.float64)[0]  # (C, *spatial)
    for p, size in zip(params[:-1], sizes, strict=True):
        w = np.asarray(p["w"], np.float64).reshape(p["w"].shape[:2])
        h = np.einsum("oi,i...->o...", w, h)
        for ax, n_out in enumerate(size):
            M = priors.linear_resize_matrix(h.shape[1 + ax], n_out)
            h = np.moveaxis(np.tensordot(M, h, axes=([1], [1 + ax])), 0, 1 + ax)
        h = np.maximum(h, 0.0)
        axes = tuple(range(1, h.ndim))
        mu = h.mean(axis=axes, keepdims=True)
        var = ((h - mu) ** 2).mean(axis=axes, keepdims=True)
        shape = (-1,) + (1,) * (h.ndim - 1)
        h = (h - mu) / np.sqrt(var + eps) * np.asarray(p["gamma"]).reshape(shape)
        h = h + np.asarray(p["beta"]).reshape(shape)
    w = np.asarray(params[-1]["w"], np.float64).reshape(params[-1]["w"].shape[:2])
    return 1 / (1 + np.exp(-np.einsum("oi,i...->o...", w, h)))


@pytest.mark.parametrize(
    "in_size,sizes,gamma_init",
    [(3, ((5, 5), (8, 8), (8, 8)), "uniform"), ((4,), ((8,), (16,), (16,)), "one")],
)
def test_decoder_matches_numpy_reference(in_size, sizes, gamma_init):
    model = priors.deep_decoder(6, in_size, sizes, out_channels=2, gamma_init=gamma_init)
    params = model.init(jax.random.key(0))
    params = [{**p, "beta": 0.1 * jnp.arange(6.0)} if "beta" in p else p for p in params]
    x = priors.fixed_input(6, in_size, seed=3)
    got = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x)))[0]
    ref = _numpy_decoder(params, x, sizes)
    assert got.shape == ref.shape == (2, *sizes[-1])
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_decoder_equals_library_deep_decoder():
    # conv before upsampling (authors' order) vs upsampling before conv: the same function
    k = 8
    ours = priors.deep_decoder(k, 4, priors.doubling_sizes(4, 3))
    lib = dyn.deep_decoder(
        k,
        4,
        dim=2,
        upsample=2,
        upsample_last=False,
        norm="channel",
        channel_form="var",
        affine=True,
        init="pytorch",
    )
    key = jax.random.key(5)
    p1, p2 = ours.init(key), lib.init(key)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    x = jnp.asarray(priors.fixed_input(k, 4))
    np.testing.assert_allclose(jax.jit(ours.apply)(p1, x), jax.jit(lib.apply)(p2, x), atol=2e-6)


def test_decoder_init_is_pytorch_default():
    model = priors.deep_decoder(64, 4, priors.doubling_sizes(4, 2), gamma_init="uniform")
    params = model.init(jax.random.key(1))
    for p in params:
        w = np.asarray(p["w"])
        bound = 1 / np.sqrt(w.shape[1])
        assert np.abs(w).max() <= bound
        np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.15)
        assert "b" not in p
    for p in params[:-1]:
        g = np.asarray(p["gamma"])
        assert 0 <= g.min() and g.max() < 1 and g.std() > 0.2  # U(0, 1): PyTorch <= 1.1
        np.testing.assert_array_equal(p["beta"], 0.0)
    p1 = priors.deep_decoder(64, 4, priors.doubling_sizes(4, 2)).init(jax.random.key(1))
    np.testing.assert_array_equal(p1[0]["gamma"], 1.0)
    assert priors.n_params(model) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def test_decoder_validation():
    with pytest.raises(ValueError, match="sizes"):
        priors.deep_decoder(4, 8, ((4, 4),))
    with pytest.raises(ValueError, match="gamma_init"):
        priors.deep_decoder(4, 4, ((8, 8),), gamma_init="zero")
    model = priors.deep_decoder(4, 4, ((8, 8),))
    with pytest.raises(ValueError, match="x must be"):
        model.apply(model.init(jax.random.key(0)), jnp.zeros((1, 4, 5, 5)))


# --------------------------------------------------------------------------- generator


@pytest.fixture(scope="module")
def generator():
    n, k = 32, 48
    U = kernels.circulant(priors.gaussian_kernel(n, 0.1))
    model = priors.two_layer_generator(U, k, omega=0.5)
    params = model.init(jax.random.key(2))
    return U, k, model, params


def test_generator_output_and_gram(generator):
    U, k, model, params = generator
    C = np.asarray(params[0]["w"], np.float64)
    v = priors.generator_output_weights(k)
    assert v[0] < 0 < v[-1] and np.allclose(np.abs(v), 1 / np.sqrt(k))
    out = np.asarray(jax.jit(model.apply)(params, jnp.zeros((3, 1))))
    np.testing.assert_allclose(out, np.broadcast_to(np.maximum(U @ C, 0) @ v, (3, 32)), atol=1e-5)
    J = kernels.generator_jacobian(U, C, v)
    for gram in (priors.generator_gram(U), priors.generator_gram(U, v)):
        np.testing.assert_allclose(jax.jit(gram)(params), J @ J.T, rtol=1e-5, atol=1e-6)
    # the generic reverse-mode Gram of the model's output agrees with the closed form
    G = jax.jit(priors.output_gram(model, jnp.zeros((1, 1))))(params)
    np.testing.assert_allclose(G, J @ J.T, rtol=1e-4, atol=1e-5)


def test_generator_gram_averages_to_dual_kernel():
    # E[J J^T] over C with iid Gaussian entries is the dual kernel, for every k: a mean over
    # 64 draws of k = 256 columns (16384 columns) is within ~1% of it
    n = 24
    U = kernels.circulant(priors.gaussian_kernel(n, 0.08))
    model = priors.two_layer_generator(U, 256)
    gram = priors.generator_gram(U)
    keys = jax.random.split(jax.random.key(0), 64)
    G = np.mean(np.asarray(jax.vmap(lambda key: gram(model.init(key)))(keys)), axis=0)
    S = kernels.generator_dual_kernel(U)
    assert np.linalg.norm(G - S) / np.linalg.norm(S) < 0.02


def test_top_eigvecs_vs_numpy():
    rng = np.random.default_rng(0)
    n = 40
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = 0.8 ** np.arange(n)
    lam[3] = lam[4]  # a degenerate pair: only its span is defined
    G = (Q * lam) @ Q.T
    w, V = jax.jit(priors.top_eigvecs, static_argnums=1)(jnp.asarray(G, jnp.float32), 7)
    np.testing.assert_allclose(w, lam[:7], rtol=1e-4)
    V = np.asarray(V)
    np.testing.assert_allclose(V @ V.T, np.eye(7), atol=1e-5)
    # each vector lies in the span of its eigenvalue's eigenvectors
    for j, span in [(0, [0]), (1, [1]), (2, [2]), (3, [3, 4]), (4, [3, 4]), (5, [5]), (6, [6])]:
        assert np.sum((Q[:, span].T @ V[j]) ** 2) > 1 - 1e-4
        assert V[j][np.argmax(np.abs(V[j]))] > 0
    jv = jax.jit(jax.vmap(lambda g: priors.top_eigvecs(g, 3)[0]))
    np.testing.assert_allclose(
        jv(jnp.stack([jnp.asarray(G, jnp.float32)] * 2))[1], lam[:3], rtol=1e-4
    )


def test_fourier_signal_and_kernel():
    x = priors.fourier_signal(64, range(3, 6), seed=1)
    assert np.isclose(np.linalg.norm(x), 1.0)
    spec = np.abs(np.fft.rfft(x)) ** 2
    assert spec[3:6].sum() / spec.sum() > 1 - 1e-12
    r = priors.gaussian_kernel(10, 0.2)
    assert np.isclose(np.linalg.norm(r), 1) and r[0] == r.max() and np.isclose(r[1], r[9])
    with pytest.raises(ValueError, match="freqs"):
        priors.fourier_signal(16, [9])


# --------------------------------------------------------------------------- data, loss, metrics


def test_data_helpers():
    x = priors.fixed_input(5, (3, 4), seed=0)
    assert x.shape == (1, 5, 3, 4) and x.dtype == np.float32 and 0 <= x.min() and x.max() < 0.1
    np.testing.assert_array_equal(x, priors.fixed_input(5, (3, 4), seed=0))
    clean = np.full((1, 64, 64), 0.5, np.float32)
    noisy = priors.add_noise(clean, 0.1, seed=1)
    assert noisy.min() >= 0 and noisy.max() <= 1
    np.testing.assert_allclose(np.std(noisy - clean), 0.1, rtol=0.05)
    clipped = priors.add_noise(clean, 1.0, seed=1)
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    u = priors.uniform_noise_like(clean, seed=2)
    np.testing.assert_allclose(np.linalg.norm(u), np.linalg.norm(clean), rtol=1e-5)
    assert u.min() >= 0
    m = priors.pixel_mask((200, 200), 1 / 3, seed=3)
    assert set(np.unique(m)) == {0.0, 1.0} and abs(m.mean() - 1 / 3) < 0.01
    A = priors.gaussian_operator(100, 400, seed=4)
    np.testing.assert_allclose(A.var(), 1 / 100, rtol=0.02)
    # separate streams: the mask does not change with the operator's draw, seeds differ
    assert not np.array_equal(priors.pixel_mask((8, 8), 0.5, 0), priors.pixel_mask((8, 8), 0.5, 1))
    with pytest.raises(ValueError, match="p must"):
        priors.pixel_mask((4,), 0.0)


def test_mask_loss_is_the_authors_mse():
    rng = np.random.default_rng(0)
    M = priors.pixel_mask((1, 6, 6), 0.4, seed=0)
    img = rng.random((1, 6, 6)).astype(np.float32)
    pred = rng.random((3, 1, 6, 6)).astype(np.float32)
    y = np.broadcast_to(M * img, (3, 1, 6, 6))
    loss = priors.mask_loss(M)
    want = np.mean((pred * M - img * M) ** 2, axis=(1, 2, 3))  # mean over ALL pixels
    np.testing.assert_allclose(loss(jnp.asarray(pred), jnp.asarray(y)), want.mean(), rtol=1e-6)
    w = jnp.asarray([0.5, 0.5, 0.0])  # a padded batch of two
    np.testing.assert_allclose(
        loss(jnp.asarray(pred), jnp.asarray(y), w), want[:2].mean(), rtol=1e-6
    )


def test_psnr_and_least_norm_baseline():
    x = np.full((4, 4), 0.5)
    assert np.isclose(float(priors.psnr(x + 0.1, x)), 20.0, atol=1e-5)  # 10 log10(1 / 0.01)
    rng = np.random.default_rng(1)
    img = rng.random(30)
    keep = rng.random(30) < 0.4
    A = np.eye(30)[keep]  # a pixel mask as a row selection: A^+ y = masked image
    got = priors.least_norm_psnr(A, A @ img, img)
    assert np.isclose(got, float(priors.psnr(np.where(keep, img, 0.0), img)), atol=1e-4)


# --------------------------------------------------------------------------- observables in a run


@pytest.fixture(scope="module")
def decoder_run():
    clean = dyn.data.sample_image("china", 16)[None]
    noisy = priors.add_noise(clean, 0.2, seed=0)
    model = priors.deep_decoder(8, 4, priors.doubling_sizes(4, 2))
    data = priors.prior_data(priors.fixed_input(8, 4), noisy, clean)
    spec = dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.adam,
        steps=20,
        record_every=10,
        sampling="full",
        observables=("loss", *priors.clean_observables(), priors.target_observable()),
        keep_state=True,
    )
    trace = jax.jit(dyn.make_run(spec))(dyn.Hparams(lr=0.01), jax.random.key(0))
    return model, data, trace


def test_clean_observables_match_host_recomputation(decoder_run):
    model, data, trace = decoder_run
    params = trace["final_state"].state.params
    f = np.asarray(jax.jit(model.apply)(params, jnp.asarray(data.x_train)), np.float64)
    ref = data.y_test.astype(np.float64)
    mse = np.mean((f - ref) ** 2)
    np.testing.assert_allclose(trace["clean_mse"][-1], mse, rtol=1e-4)
    np.testing.assert_allclose(trace["clean_psnr"][-1], 10 * np.log10(1 / mse), atol=1e-3)
    rel = np.linalg.norm(f - ref) / np.linalg.norm(ref)
    np.testing.assert_allclose(trace["clean_rel_error"][-1], rel, rtol=1e-4)
    target = 10 * np.log10(1 / np.mean((data.y_train - data.y_test) ** 2))
    np.testing.assert_allclose(trace["target_psnr"], target, atol=1e-3)
    # the loss is to the noisy target, the clean error is not: they differ
    assert abs(float(trace["loss"][-1]) - float(trace["clean_mse"][-1])) > 1e-4


def test_jacobian_observables_in_a_run():
    n, k, top = 32, 64, 5
    U = kernels.circulant(priors.gaussian_kernel(n, 0.1))
    model = priors.two_layer_generator(U, k, omega=0.1)
    _, ref = priors.dual_kernel_eigvecs(U, top)
    obs = priors.jacobian_observables(top, priors.generator_gram(U), reference=ref)
    clean = priors.fourier_signal(n, range(3), seed=0)
    data = priors.prior_data(np.zeros((1, 1), np.float32), clean, clean)
    spec = dyn.RunSpec(
        model=model,
        data=data,
        loss="square",
        stepper=dyn.gd,
        steps=40,
        record_every=10,
        slow_every=2,
        sampling="full",
        observables=("loss", *obs),
    )
    key = jax.random.key(3)
    tr = jax.jit(jax.vmap(dyn.make_run(spec)))(dyn.hparams(lr=[1.0, 1.0]), jnp.stack([key] * 2))
    # at initialization: the spectrum of J J^T of the run's own initial C
    C0 = np.asarray(model.init(jax.random.split(key)[0])[0]["w"], np.float64)
    J = kernels.generator_jacobian(U, C0, priors.generator_output_weights(k))
    w, V = np.linalg.eigh(J @ J.T)
    np.testing.assert_allclose(tr["jac_sv"][0, 0], np.sqrt(w[::-1][:top]), rtol=1e-4)
    overlap = np.sum((np.asarray(tr["jac_vec"][0, 0]) @ V[:, ::-1][:, :top]) ** 2, axis=1)
    np.testing.assert_allclose(overlap.sum(), top, atol=1e-3)  # the same top subspace
    np.testing.assert_allclose(tr["jac_drift"][0, 0], 1.0, atol=1e-4)
    want_ref = np.sum((V[:, ::-1][:, :top].T @ np.linalg.qr(ref.T)[0]) ** 2)
    np.testing.assert_allclose(np.sum(tr["jac_ref"][0, 0]), want_ref, atol=1e-3)
    # costly tier: NaN between slow records, values at every second record
    assert np.isnan(tr["jac_sv"][0, 1]).all() and np.isfinite(tr["jac_sv"][0, 2]).all()
    drift = tr["jac_drift"][0, 2::2]
    assert ((drift <= 1 + 1e-5) & (drift > 0)).all()
    with pytest.raises(ValueError, match="reference"):
        priors.jacobian_observables(top, priors.generator_gram(U), reference=ref[:2])
