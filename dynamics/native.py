"""Compiled CPU kernels for what XLA's CPU backend does slowly at the sizes of a training run.

`svdvals(x)`: the singular values of a batch of small float32 matrices, as an XLA FFI custom
call (source: `dynamics/_native/svdvals.cc`). A 64 x 64 matrix takes about a third of the time
of LAPACK's `sgesdd` through `jnp.linalg.svd`, which spends most of its time in call overhead
and short scalar loops at these sizes (`make bench` measures both); the results agree with a
float64 reference to a few units in the last place (tests/test_native.py).

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`, with `-march=native`) against the XLA FFI headers that ship with jaxlib,
into `$DYNAMICS_NATIVE_DIR` (default `~/.cache/dynamics/native`), keyed by the source, the
compiler, jaxlib's version and the CPU, so each machine builds it once (a few seconds). Where
no compiler works, or with `DYNAMICS_NATIVE=0`, `available()` is False and callers use LAPACK;
`status()` says why.
"""

from __future__ import annotations

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
TARGETS = (TARGET, GRAD_PAIRS)
SOURCE = Path(__file__).with_name("_native") / "svdvals.cc"

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
    base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-I", include, str(SOURCE), "-o", tmp]
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
            for s in (SOURCE.read_text(), _version(cxx), jaxlib.__version__, _cpu_id(), include)
        )
    ).hexdigest()[:20]
    path = library_dir() / f"svdvals-{key}.so"
    if not path.exists():
        _build(cxx, include, path)
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DynamicsSvdvals), platform="cpu")
    jax.ffi.register_ffi_target(
        GRAD_PAIRS, jax.ffi.pycapsule(lib.DynamicsGradPairs), platform="cpu"
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
    return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(x)


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
    return dots, sq, new
