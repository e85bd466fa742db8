"""Compiled CPU kernels for what XLA's CPU backend does slowly at the sizes of a training run.

`svdvals(x)`: the singular values of a batch of small float32 matrices, as an XLA FFI custom
call (source: `dynamics/_native/svdvals.cc`). A 64 x 64 matrix takes about a third of the time
of LAPACK's `sgesdd` through `jnp.linalg.svd`, which spends most of its time in call overhead
and short scalar loops at these sizes (`make bench` measures both); the results agree with a
float64 reference to a few units in the last place (tests/test_native.py).

`compiled_random()`: a context in which programs lowered for the CPU compute the Threefry hash
of JAX's random numbers (every `jax.random` draw) with a compiled kernel (source:
`dynamics/_native/random.cc`): the same bits, and no LLVM time for the hash's loop kernels,
which otherwise cost about a second of compile per random draw of a program (the runner lowers
its programs in it).

`dense_grad(...)`: the loss and gradient of a plain MLP on a weighted batch in one call per
batch of runs (source: `dynamics/_native/dense.cc`), each run computed alone with register-
blocked products; `dense_loss_fn(model, loss)` wraps it as a loss function whose reverse-mode
gradient is the kernel's, which the training step uses on the CPU (`RunSpec.gradient`).

The kernels are compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`, with `-march=native`) against the XLA FFI headers that ship with jaxlib,
into `$DYNAMICS_NATIVE_DIR` (default `~/.cache/dynamics/native`), keyed by the source, the
compiler, jaxlib's version and the CPU, so each machine builds it once (a few seconds). Where
no compiler works, or with `DYNAMICS_NATIVE=0`, `available()` is False and callers use LAPACK;
`status()` says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

TARGET = "dynamics_svdvals"
GRAD_PAIRS = "dynamics_grad_pairs"
DENSE_GRAD = "dynamics_dense_grad"
THREEFRY = "dynamics_threefry2x32"
TARGETS = (TARGET, GRAD_PAIRS, DENSE_GRAD, THREEFRY)
SOURCES = tuple(
    Path(__file__).with_name("_native") / f for f in ("svdvals.cc", "dense.cc", "random.cc")
)

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "path": None, "error": None}


def library_dir() -> Path:
    env = os.environ.get("DYNAMICS_NATIVE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(base) / "dynamics" / "native"


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: the machine and its CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}:{flags}"


def _version(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return r.stdout.splitlines()[0] if r.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cxx: str, include: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    srcs = [str(p) for p in SOURCES]
    base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-I", include, *srcs, "-o", tmp]
    errors = []
    try:
        for extra in (["-march=native"], []):
            r = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)  # atomic: a process that loses the race loads the same file
                return
            errors.append((r.stderr or r.stdout).strip().splitlines()[-1:] or ["failed"])
        raise RuntimeError(f"{os.path.basename(cxx)} failed: {errors[0][0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    import jax
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                *(p.read_text() for p in SOURCES),
                _version(cxx),
                jaxlib.__version__,
                _cpu_id(),
                include,
            )
        )
    ).hexdigest()[:20]
    path = library_dir() / f"svdvals-{key}.so"
    if not path.exists():
        import sys
        import time

        t0 = time.perf_counter()
        sys.stderr.write(
            f"dynamics: building the compiled CPU kernels into {path.parent} (once per machine "
            "and jaxlib version; DYNAMICS_NATIVE=0 skips them)...\n"
        )
        sys.stderr.flush()
        _build(cxx, include, path)
        sys.stderr.write(f"dynamics: kernels built in {time.perf_counter() - t0:.0f} s\n")
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DynamicsSvdvals), platform="cpu")
    jax.ffi.register_ffi_target(
        GRAD_PAIRS, jax.ffi.pycapsule(lib.DynamicsGradPairs), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        DENSE_GRAD, jax.ffi.pycapsule(lib.DynamicsDenseGrad), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        THREEFRY, jax.ffi.pycapsule(lib.DynamicsThreefry2x32), platform="cpu"
    )
    _state.update(lib=lib, path=str(path))


def available() -> bool:
    """Whether the kernel is built, loaded and registered with XLA's CPU backend (it is built on
    the first call). Never raises: a failure is kept in `status()` and warned about once."""
    if os.environ.get("DYNAMICS_NATIVE", "1") == "0":
        return False
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _load()
            except Exception as e:  # no compiler, no headers, a failed build: LAPACK instead
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"dynamics.native: the singular-value kernel is unavailable, using LAPACK "
                    f"({_state['error']})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _state["lib"] is not None


def status() -> dict:
    """{"available", "path" of the loaded library, "error" of a failed build, "disabled"}."""
    disabled = os.environ.get("DYNAMICS_NATIVE", "1") == "0"
    ok = False if disabled else available()
    return {"available": ok, "path": _state["path"], "error": _state["error"], "disabled": disabled}


def svdvals(x):
    """Singular values of the float32 matrices x (..., r, c), descending: (..., min(r, c)).

    Requires `available()`. Vectorizes (vmap) into one call over the whole batch; the kernel
    runs on the calling thread, so it is safe on several simulated CPU devices at once."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"svdvals: expected matrices (..., r, c), got shape {x.shape}")
    k = min(x.shape[-2:])
    out = jax.ShapeDtypeStruct(x.shape[:-2] + (k,), jnp.float32)
    return _varying_like(jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(x), x)


def grad_pairs(grads, prev):
    """(dots, squares, grads) for lists of per-layer arrays: dots[k] = <prev_k, grads_k>,
    squares[k] = |grads_k|^2 (shape (L,)), and the gradients again, written over `prev`'s
    buffers (the previous gradient of the next step). One pass over each gradient, where XLA
    takes two reductions and a copy into the loop state. Requires `available()`."""
    import jax
    import jax.numpy as jnp

    n = len(grads)
    out = (
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        *[jax.ShapeDtypeStruct(g.shape, jnp.float32) for g in grads],
    )
    call = jax.ffi.ffi_call(
        GRAD_PAIRS,
        out,
        vmap_method="broadcast_all",
        input_output_aliases={n + k: 2 + k for k in range(n)},
    )
    dots, sq, *new = call(*[jnp.asarray(g, jnp.float32) for g in grads], *prev)
    return _varying_like((dots, sq, new), (grads, prev))


# --------------------------------------------------------------------------- dense networks

DENSE_ACTIVATIONS = {"linear": 0, "relu": 1, "tanh": 2}
DENSE_LOSSES = {"square": 0, "cross_entropy": 1}


def dense_grad(net, loss: str, x, t, w, weights, biases=()):
    """(loss, weight gradients, bias gradients) of the MLP `net` (a `models.Dense`) on a weighted
    batch: x (B, d_0) inputs, t (B, C) float targets or (B,) int32 class labels (one-hot),
    w (B,) example weights, weights[k] (out, in), biases[k] (out,) when `net.bias`. The loss is
    sum_i [w_i > 0] w_i l_i with l_i the square loss mean_j (f_ij - t_ij)^2 (loss "square") or
    the cross-entropy -sum_j t_ij log softmax(f_i)_j ("cross_entropy"). Requires `available()`; vectorizes (vmap) into
    one call over every run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = len(weights)
    f32 = jnp.float32
    out = (
        jax.ShapeDtypeStruct(jnp.shape(w)[:-1], f32),
        *[jax.ShapeDtypeStruct(jnp.shape(W), f32) for W in weights],
        *[jax.ShapeDtypeStruct(jnp.shape(b), f32) for b in biases],
    )
    call = jax.ffi.ffi_call(DENSE_GRAD, out, vmap_method="broadcast_all")
    res = call(
        jnp.asarray(x, f32),
        jnp.asarray(t, jnp.int32 if jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer) else f32),
        jnp.asarray(w, f32),
        *[jnp.asarray(W, f32) for W in weights],
        *[jnp.asarray(b, f32) for b in biases],
        activation=np.int32(DENSE_ACTIVATIONS[net.activation]),
        loss=np.int32(DENSE_LOSSES[loss]),
        bias=np.int32(bool(biases)),
        multipliers=np.asarray(net.multipliers, np.float32),
    )
    return res[0], list(res[1 : 1 + n]), list(res[1 + n :])


def _vma(x) -> frozenset:
    """The mesh axes a value varies over inside `shard_map` (JAX keeps them on its type)."""
    import jax

    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)
    if axes is None:
        axes = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(axes or ())


def _varying_like(out, inputs):
    """A custom call's results marked as varying over the mesh axes its inputs vary over (inside
    `shard_map` with its type checks on), as computations of those inputs are."""
    import jax

    axes = frozenset()
    for leaf in jax.tree.leaves(inputs):
        axes |= _vma(leaf)
    if not axes:
        return out

    def vary(x):
        missing = tuple(sorted(axes - _vma(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(vary, out)


def _loss_name(loss) -> str | None:
    from dynamics import losses

    if isinstance(loss, str):
        return loss if loss in DENSE_LOSSES else None
    return {losses.square_loss: "square", losses.cross_entropy: "cross_entropy"}.get(loss)


def dense_eligible(model, loss) -> bool:
    """Whether `dense_loss_fn` computes this model's gradients: a plain MLP (`models.mlp`
    without normalization, plain weights, ReLU / tanh / identity) and the square or
    cross-entropy loss."""
    net = getattr(model, "dense", None)
    return net is not None and net.activation in DENSE_ACTIVATIONS and _loss_name(loss) is not None


def dense_loss_fn(model, loss):
    """`loss_fn(params, batch)` of a plain MLP whose reverse-mode gradient comes from the compiled
    kernel on the CPU (one call per step for every run of a vmapped batch of runs; autodiff on
    other platforms), or None where `dense_eligible` is False.

    Its value is the model's loss as `train.make_loss_fn` computes it; `jax.grad` and
    `jax.value_and_grad` of it give the kernel's loss and gradient, which agree with autodiff's
    to float rounding (tests/test_native_dense.py). It is for training steps: it has no
    forward-mode derivative, so observables that need one (sharpness) use the plain loss."""
    if not dense_eligible(model, loss):
        return None
    import jax
    import jax.numpy as jnp

    from dynamics import losses as _losses

    net, name = model.dense, _loss_name(loss)
    loss_f = _losses.resolve(loss)

    def plain(params, batch):
        return loss_f(model.apply(params, batch.x, batch.weights > 0), batch.y, batch.weights)

    def autodiff(params, batch):
        return jax.value_and_grad(plain)(params, batch)

    def kernel(params, batch):
        leaves = jax.tree.leaves(params)
        keys = [set(p) for p in params]
        expected = {"w", "b"} if net.bias else {"w"}
        if any(k != expected for k in keys) or any(a.dtype != jnp.float32 for a in leaves):
            return autodiff(params, batch)
        x = batch.x.reshape(batch.x.shape[0], -1)
        c = net.widths[-1]
        y = batch.y
        if jnp.issubdtype(y.dtype, jnp.integer):
            t = y.reshape(y.shape[0]).astype(jnp.int32)  # one-hot in the kernel
        else:
            t = y.reshape(y.shape[0], c).astype(jnp.float32)
        value, gw, gb = dense_grad(
            net,
            name,
            x,
            t,
            batch.weights,
            [p["w"] for p in params],
            [p["b"] for p in params] if net.bias else (),
        )
        grads = [{"w": g} for g in gw]
        for p, g in zip(grads, gb, strict=False):
            p["b"] = g
        return _varying_like((value, grads), (params, batch))

    def value_and_grad(params, batch):
        return jax.lax.platform_dependent(params, batch, cpu=kernel, default=autodiff)

    @jax.custom_vjp
    def loss_fn(params, batch):
        return plain(params, batch)

    def bwd(grads, ct):  # the forward pass keeps the gradient as its residual
        return jax.tree.map(lambda g: g * ct, grads), None

    loss_fn.defvjp(value_and_grad, bwd)
    return loss_fn


# --------------------------------------------------------------------------- random numbers

_random_on = contextvars.ContextVar("dynamics_compiled_random", default=False)
_random_rule: dict = {"installed": False}


def _threefry_module():
    try:
        from jax._src.random import threefry2x32 as mod
    except ImportError:  # older layouts of JAX's sources
        try:
            from jax._src import prng as mod
        except ImportError:
            return None
    ok = hasattr(mod, "threefry2x32_p") and hasattr(mod, "_threefry2x32_cpu_lowering_rule")
    return mod if ok else None


def _install_random_rule() -> bool:
    """Registers the CPU lowering of JAX's `threefry2x32_p` that `compiled_random` switches
    (once per process); False where this JAX has no such primitive or rule (the context is then
    a no-op)."""
    with _lock:
        if not _random_rule["installed"]:
            mod = _threefry_module()
            if mod is None:
                return False
            import jax
            import jax.numpy as jnp
            from jax.interpreters import mlir

            default = mod._threefry2x32_cpu_lowering_rule
            _random_rule["installed"] = True

            def hashed(k1, k2, x1, x2):  # the kernel takes four arrays of one shape
                shape = jnp.broadcast_shapes(k1.shape, k2.shape, x1.shape, x2.shape)
                args = [jnp.broadcast_to(v, shape) for v in (k1, k2, x1, x2)]
                out = jax.ShapeDtypeStruct(shape, jnp.uint32)
                return jax.ffi.ffi_call(THREEFRY, (out, out))(*args)

            compiled = mlir.lower_fun(hashed, multiple_results=True)

            def rule(ctx, *args):
                on = _random_on.get() and available()
                return (compiled if on else default)(ctx, *args)

            mlir.register_lowering(mod.threefry2x32_p, rule, platform="cpu")
        return True


@contextlib.contextmanager
def compiled_random(on: bool = True):
    """Programs lowered in this context (in this thread) for the CPU compute the Threefry-2x32
    hash of `jax.random` with the compiled kernel where `available()`, else with JAX's own
    lowering; the bits are the same either way (tests/test_native_random.py). A program that
    holds the kernel's call needs the kernels loaded to compile (`available()`) and lists its
    target among `TARGETS` for `jax.export`."""
    if on and not _install_random_rule():
        on = False
    token = _random_on.set(on)
    try:
        yield
    finally:
        _random_on.reset(token)
