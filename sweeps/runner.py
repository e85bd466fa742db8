"""The sweep runner: a grid of runs as a few compiled, vectorized, sharded programs.

1. Groups: one per static point (and per batch size when runs are bucketed by it); each group
   is one program, `jit(vmap(run))`, compiled once.
2. Chunks: each group's runs are cut into equal rectangular blocks of the grid, sized to the
   device memory; a chunk's run axis is sharded over every local device (one-axis mesh),
   padded to a multiple of the device count, and its results are written into its own region
   (and Zarr chunks) of the store, then marked done.
3. Resume: chunks marked done are skipped. Several processes (`--distributed`) take disjoint
   chunks (chunk i goes to process i mod P); process 0 creates the store and finishes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import os
import subprocess
import time
from typing import Any

import numpy as np

from sweeps import store as _store
from sweeps.spec import Resolved, SpecError

# Runs per chunk and CPU device. A CPU step's batched matmuls and reductions run faster on a few
# runs whose working set stays in the core's caches than on many: on the reference grid (2 cores)
# chunks of 8 runs per device computed the grid 5% faster with all observables and 18% faster
# recording the loss than chunks of 32 per device (`make bench`'s interleaved timing).
CPU_RUNS_PER_DEVICE = 8
ACCELERATOR_CHUNK_CAP = 16384


# --------------------------------------------------------------------------- JAX set-up


def cache_dir() -> str | None:
    from dynamics.cache import cache_dir as _dir

    return _dir()


def default_cpu_devices() -> int:
    """One CPU device per core this process may use (DYNAMICS_CPU_DEVICES overrides).

    XLA runs each small batched matmul of a vmapped run on one thread, so a single CPU device
    leaves the other cores idle; one device per core runs a chunk's shards side by side
    (measured: 2.3x on 2 cores, `make bench`).
    """
    env = os.environ.get("DYNAMICS_CPU_DEVICES")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_jax(cpu_devices: int | None = None) -> None:
    """Before JAX starts: the persistent compilation cache, and the number of CPU devices
    (default: one per core; it only affects the CPU backend)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices or default_cpu_devices()))
    except RuntimeError:  # JAX already started (e.g. the runner called from a Python session)
        if cpu_devices and cpu_devices != jax.local_device_count():
            raise SpecError(
                f"--devices: JAX has already started with {jax.local_device_count()} devices"
            ) from None
    from dynamics.cache import enable_compilation_cache

    enable_compilation_cache()


@dataclasses.dataclass
class Distributed:
    """JAX's multi-process runtime: which process this is, and its key-value store."""

    index: int = 0
    count: int = 1
    client: Any = None

    @classmethod
    def initialize(cls, coordinator=None, num_processes=None, process_id=None) -> Distributed:
        import jax

        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
        from jax._src import distributed as _dist

        return cls(jax.process_index(), jax.process_count(), _dist.global_state.client)

    def put(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.key_value_set(key, value)

    def get(self, key: str, timeout_s: float = 3600) -> str:
        return self.client.blocking_key_value_get(key, int(timeout_s * 1000))

    def barrier(self, name: str, timeout_s: float = 24 * 3600) -> None:
        if self.client is not None:
            self.client.wait_at_barrier(name, int(timeout_s * 1000))


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Group:
    index: tuple[int, ...]  # index of the group along the group axes
    point: dict[str, Any]  # static settings of the group
    spec: Any  # RunSpec with the group's static batch


@dataclasses.dataclass(frozen=True)
class Chunk:
    id: int
    group: int
    region: tuple[slice, ...]  # over the grid axes (static + traced)


@dataclasses.dataclass
class Plan:
    res: Resolved
    axes: list[str]  # static axes then traced axes
    coords: dict[str, list]
    strategy: str  # "bucket" or "mask"
    groups: list[Group]
    block: dict[str, int]  # chunk length along every axis
    chunks: list[Chunk]
    n_layers: int
    n_sv: int
    steps: np.ndarray  # the record coordinate: steps, or epochs when the length is in epochs
    dims: dict[str, tuple[str, ...]]  # variable -> dims beyond the grid axes
    docs: dict[str, str]
    record_axis: str = "step"
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # every non-grid dimension

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[a]) for a in self.axes)

    @property
    def chunk_runs(self) -> int:
        return math.prod(self.block[a] for a in self.axes)


def choose_strategy(res: Resolved, specs) -> str:
    """How runs of different batch sizes share programs (`make bench` measures both):

    "bucket": one program per batch size, each computing only its own batch;
    "mask": one program at the largest size, each run's batch masked to its true size.

    Masking computes every run at the largest size, except where the compiled MLP gradient
    trains the model (`dynamics.native.dense_loss_fn`, on the CPU): it never reads past a batch's
    last example of nonzero weight, so a masked run costs about what its true batch size does
    (the reference grid: 4-9% more run time than bucketing) while the sweep compiles one program
    instead of one per batch size (cold compile 32.5 s -> 7.5-9.4 s there). So "auto" masks with
    one batch size, full-batch sampling or that kernel, and buckets otherwise."""
    epochs = specs[0][1].epochs is not None and specs[0][1].sampling != "full"
    if epochs and len(res.grid["batch_size"]) > 1:
        if res.batch_strategy == "mask":
            raise SpecError(
                "batch_strategy: 'mask' cannot train several batch sizes for the same number of "
                "epochs (each takes its own number of steps); use 'auto' or 'bucket'"
            )
        return "bucket"
    if res.batch_strategy != "auto":
        return res.batch_strategy
    if len(res.grid["batch_size"]) == 1 or specs[0][1].sampling == "full":
        return "mask"
    from dynamics.train import cpu_kernels, dense_gradient

    if cpu_kernels() and all(dense_gradient(spec) for _, spec in specs):
        return "mask"
    return "bucket"


def activation_floats(spec) -> int:
    """Floats of every intermediate of one example's forward pass (an upper bound on what a
    backward pass keeps), read off the jaxpr."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((2,) + tuple(spec.data.x_train.shape[1:]), jnp.float32)
    params = jax.eval_shape(spec.model.init, jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda p, x: spec.model.apply(p, x, None))(params, x)
    total = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            total += math.prod(getattr(v.aval, "shape", ())) or 1
    return max(1, total // 2)


def estimate_run_bytes(spec, trace_floats: int) -> int:
    """Device bytes one run of a vmapped chunk needs (parameters, optimizer and gradient copies,
    activations of a training batch and of the evaluation pass, its records)."""
    import jax

    params = jax.eval_shape(spec.model.init, jax.random.key(0))
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    act = activation_floats(spec)
    n_eval = min(spec.eval_size or spec.data.x_train.shape[0], spec.data.x_train.shape[0])
    floats = 10 * n_params + 3 * spec.static_batch * act + 2 * n_eval * act + trace_floats
    floats += spec.data.x_train[:1].size * spec.static_batch
    return 4 * floats


def memory_budget() -> tuple[int, int]:
    """(bytes a chunk may use, cap on runs per chunk) for the local devices."""
    import jax

    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 8 << 30
        return int(0.25 * total), CPU_RUNS_PER_DEVICE * len(jax.local_devices())
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit", 16 << 30)
    return int(0.5 * limit) * len(jax.local_devices()), ACCELERATOR_CHUNK_CAP


def _block_shape(
    axes: list[str], shape: dict[str, int], fixed: set[str], target: int
) -> dict[str, int]:
    """Largest rectangular block of at most `target` runs: whole trailing axes, part of one."""
    block = {a: 1 for a in axes}
    prod = 1
    for a in reversed(axes):
        if a in fixed:
            continue
        n = shape[a]
        if prod * n <= target:
            block[a] = n
            prod *= n
        else:
            block[a] = max(1, target // prod)
            break
    return block


def plan(
    res: Resolved, specs: list, chunk_runs: int | None = None, layout: dict | None = None
) -> Plan:
    from dynamics.train import describe, docs

    strategy = layout["strategy"] if layout else choose_strategy(res, specs)
    static_axes = res.static_axes
    grid_axes = res.grid_axes
    axes = static_axes + grid_axes
    coords = {**res.static, **res.grid}
    observables = specs[0][1].observables
    steps = specs[0][1].record_coords()
    record_axis = specs[0][1].record_axis
    for _, s in specs[1:]:
        same = s.record_axis == record_axis and np.array_equal(s.record_coords(), steps)
        if s.observables != observables or not same:
            raise SpecError("static: every static point must record the same observables and steps")

    groups: list[Group] = []
    bucket = strategy == "bucket"
    bs_values = res.grid["batch_size"]
    static_index = list(itertools.product(*[range(len(v)) for v in res.static.values()])) or [()]
    for idx, (point, spec) in zip(static_index, specs, strict=True):
        if bucket:
            for j, bs in enumerate(bs_values):
                groups.append(Group(idx + (j,), point, dataclasses.replace(spec, batch=int(bs))))
        elif spec.sampling == "full":
            groups.append(Group(idx, point, spec))
        else:
            groups.append(Group(idx, point, dataclasses.replace(spec, batch=int(max(bs_values)))))

    import jax

    from dynamics import observables as obs

    n_layers = n_sv = 0
    for g in groups:
        shapes = jax.eval_shape(g.spec.model.init, jax.random.key(0))
        n_layers = max(n_layers, len(shapes))
        n_sv = max(n_sv, obs.max_singular_values(shapes))
    dims = describe(groups[0].spec)
    sizes = {record_axis: len(steps), "layer": n_layers, "sv_index": n_sv}
    sizes.update(_user_dim_sizes(groups, dims, sizes))
    trace_floats = sum(math.prod(sizes[d] for d in dd) for dd in dims.values())

    shape = {a: len(coords[a]) for a in axes}
    fixed = set(static_axes) | ({"batch_size"} if bucket else set())
    if layout:
        block = dict(layout["block"])
    else:
        if chunk_runs is None:
            budget, cap = memory_budget()
            per_run = max(estimate_run_bytes(g.spec, trace_floats) for g in groups)
            chunk_runs = max(1, min(cap, budget // per_run))
        block = _block_shape(axes, shape, fixed, int(chunk_runs))

    chunks: list[Chunk] = []
    group_axes = static_axes + (["batch_size"] if bucket else [])
    for gi, g in enumerate(groups):
        gidx = dict(zip(group_axes, g.index, strict=True))
        ranges = []
        for a in axes:
            if a in gidx:
                ranges.append([slice(gidx[a], gidx[a] + 1)])
            else:
                n, b = shape[a], block[a]
                ranges.append([slice(i, min(i + b, n)) for i in range(0, n, b)])
        for region in itertools.product(*ranges):
            chunks.append(Chunk(len(chunks), gi, tuple(region)))
    all_docs = docs(groups[0].spec)
    return Plan(
        res,
        axes,
        coords,
        strategy,
        groups,
        block,
        chunks,
        n_layers,
        n_sv,
        steps,
        dims,
        {n: all_docs.get(n, "") for n in dims},
        record_axis,
        sizes,
    )


def _user_dim_sizes(groups, dims, known: dict) -> dict[str, int]:
    """Lengths of the dimensions users' observables name beyond the known ones, read off the
    traced shapes of one run of every group (the largest across groups)."""
    extra = {d for dd in dims.values() for d in dd if d not in known}
    if not extra:
        return {}
    import jax

    from dynamics.steps import Hparams
    from dynamics.train import as_hparams, make_run

    out: dict[str, int] = {}
    for g in groups:
        shapes = jax.eval_shape(make_run(g.spec), as_hparams(Hparams()), jax.random.key(0))
        for name, dd in dims.items():
            for d, n in zip(dd, shapes[name].shape, strict=True):
                if d in extra:
                    out[d] = max(out.get(d, 0), int(n))
    return out


# --------------------------------------------------------------------------- the store


def _coord_array(values: list) -> np.ndarray:
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.int64)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.float64)
    return np.asarray(["none" if v is None else str(v) for v in values])


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    from importlib import metadata

    out = {}
    for name in (
        "dynamics",
        "jax",
        "jaxlib",
        "optax",
        "diffrax",
        "numpy",
        "xarray",
        "zarr",
        "flax",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return tuple(out.items())


def package_versions() -> dict[str, str]:
    """Versions of the project and of the libraries a program depends on (read once)."""
    return dict(_versions())


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def create_store(url: str, p: Plan, dist: Distributed) -> None:
    import jax

    coords = {a: _coord_array(p.coords[a]) for a in p.axes}
    coords[p.record_axis] = np.asarray(p.steps, np.int64)
    for d, n in p.sizes.items():
        if d not in coords and d not in ("layer", "sv_index"):
            coords[d] = np.arange(n)
    coords["layer"] = np.arange(p.n_layers)
    if p.n_sv:
        coords["sv_index"] = np.arange(p.n_sv)
    variables = {}
    for name, d in p.dims.items():
        if name == "status":
            dtype, fill = np.int8, -1
        elif name in ("diverged_step", "step"):
            dtype, fill = np.int32, -1
        else:
            dtype, fill = np.float32, np.nan
        variables[name] = (tuple(p.axes) + d, dtype, fill, {"description": p.docs.get(name, "")})
    dev = jax.local_devices()[0]
    attrs = {
        "sweep": p.res.sweep.name,
        "description": p.res.sweep.description,
        "scale": p.res.scale,
        "spec": _store.json_attr(p.res.describe()),
        "spec_source": p.res.sweep.source,
        "fingerprint": p.res.fingerprint(),
        "layout": _store.json_attr({"strategy": p.strategy, "block": p.block}),
        "package_versions": _store.json_attr(package_versions()),
        "git_commit": git_commit(),
        "device_kind": dev.device_kind,
        "device_platform": dev.platform,
        "device_count": len(jax.devices()),
        "process_count": dist.count,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compile_seconds": 0.0,
        "run_seconds": 0.0,
    }
    _store.create(url, coords, variables, p.block, attrs, len(p.chunks))


# --------------------------------------------------------------------------- execution


class Program:
    """One group's `jit(vmap(run))`, sharded over the local devices, compiled once."""

    def __init__(self, spec, n_pad: int, mesh, key: str | None = None):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from dynamics.train import make_run, run_data

        run = make_run(spec)

        def one(hp, seed, data):
            return run(hp, jax.random.key(seed), data)

        shard = NamedSharding(mesh, P("runs"))
        repl = NamedSharding(mesh, P())
        self.data = jax.device_put(run_data(spec), repl)
        # shard_map, not jit's automatic partitioning: every device runs the vmapped program on
        # its own runs with no communication at all. (Partitioning the vmapped LAPACK calls of
        # the spectra automatically inserts cross-device collectives, which deadlock on
        # simulated CPU devices.)
        local = jax.shard_map(
            jax.vmap(one, in_axes=(0, 0, None)),
            mesh=mesh,
            in_specs=(P("runs"), P("runs"), P()),
            out_specs=P("runs"),
            check_vma=False,  # runs are independent: nothing is replicated or reduced
        )
        self.fn = jax.jit(local, in_shardings=(shard, shard, repl), out_shardings=shard)
        self.shard = shard
        self.spec = spec
        self.n_pad = n_pad
        self.key = key
        self.compiled = None
        self.compile_seconds = 0.0

    def compile(self, hp, seeds) -> None:
        """Compile once. With a key, the traced and lowered program is also kept on disk
        (jax.export), so a later process skips Python tracing and lowering and only loads the
        compiled code from JAX's persistent cache."""
        import jax

        hp, seeds = jax.device_put((hp, seeds), self.shard)
        t = time.perf_counter()
        if _uses_native(self.spec):  # a loaded program may call the kernels: register them
            from dynamics import native

            native.available()
        self.compiled = self._load_exported(hp, seeds)
        if self.compiled is None:
            self.compiled = self._export_and_compile(hp, seeds)
        self.compile_seconds = time.perf_counter() - t

    def _path(self):
        d = cache_dir()
        return None if (d is None or self.key is None) else os.path.join(d, "exports", self.key)

    def _load_exported(self, hp, seeds):
        import jax

        path = self._path()
        if path is None or not os.path.exists(path) or not _export_ready():
            return None
        from jax import export

        try:
            with open(path, "rb") as f:
                exp = export.deserialize(bytearray(f.read()))
            return jax.jit(exp.call).lower(hp, seeds, self.data).compile()
        except Exception:  # a damaged or foreign file: trace again
            return None

    def _export_and_compile(self, hp, seeds):
        import jax

        path = self._path()
        if path is None or not _export_ready():
            return self.fn.lower(hp, seeds, self.data).compile()
        from jax import export

        from dynamics import native

        # the compiled spectral kernel is this project's own custom call (dynamics.native)
        checks = [export.DisabledSafetyCheck.custom_call(t) for t in native.TARGETS]
        exp = export.export(self.fn, disabled_checks=checks)(hp, seeds, self.data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(exp.serialize())
        os.replace(tmp, path)
        return jax.jit(exp.call).lower(hp, seeds, self.data).compile()

    def __call__(self, hp, seeds):
        import jax

        if self.compiled is None:
            self.compile(hp, seeds)
        hp, seeds = jax.device_put((hp, seeds), self.shard)
        return self.compiled(hp, seeds, self.data)


_EXPORT_READY: bool | None = None


def _uses_native(spec) -> bool:
    """Whether the spec's program may call the compiled kernels (spectra, adjacent gradients,
    a plain MLP's training gradient)."""
    from dynamics.train import ALIASES, dense_gradient, resolve_observables

    wanted = {"sv", "rank", "stable_rank", *ALIASES["grad_corr"]}
    if dense_gradient(spec):
        return True
    return bool(wanted & set(resolve_observables(spec.observables)))


def runs_per_device(chunk_runs: int, n_dev: int) -> int:
    """Runs each device computes per call: the chunk padded to a multiple of the devices, and
    never a single one. XLA drops a vmapped axis of length one and computes the lone run with
    other matmul kernels, whose rounding differs; from two runs per device up, a run's numbers
    are bit-identical however the runs are chunked or sharded (tests/test_sweeps.py)."""
    return max(2, math.ceil(chunk_runs / n_dev))


def prepare(p: Plan, chunks, mesh, code: str | None = None) -> tuple[list, int]:
    """Each chunk's (chunk, program, hp, seeds, n), one `Program` per group, every program
    compiled; and the number of programs. With `code` (a `_code_stamp()`), programs are keyed
    for the on-disk export cache. Programs compile several at a time: XLA compiles (and loads
    cached executables) outside the GIL, so they compile side by side on the host's cores."""
    n_dev = len(mesh.devices.flat)
    n_pad = runs_per_device(p.chunk_runs, n_dev) * n_dev
    programs: dict[int, tuple] = {}  # group -> (program, hp, seeds of its first chunk)
    inputs = []
    for c in chunks:
        hp, seeds, n = chunk_inputs(p, c, n_pad, n_dev)
        if c.group not in programs:
            group = p.groups[c.group]
            key = None if code is None else program_key(p, group, n_pad, code)
            programs[c.group] = (Program(group.spec, n_pad, mesh, key=key), hp, seeds)
        inputs.append((c, programs[c.group][0], hp, seeds, n))
    todo = list(programs.values())
    workers = min(len(todo), default_cpu_devices())
    if workers <= 1:
        for prog, hp, seeds in todo:
            prog.compile(hp, seeds)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(prog.compile, hp, seeds) for prog, hp, seeds in todo]:
                f.result()
    return inputs, len(programs)


def _export_ready() -> bool:
    """jax.export serialization is available and knows the project's NamedTuples."""
    global _EXPORT_READY
    if _EXPORT_READY is None:
        try:
            import flatbuffers  # noqa: F401  (needed by jax.export serialization)
            from jax import export

            from dynamics.steps import Hparams
            from dynamics.train import RunData

            for cls in (Hparams, RunData):
                try:
                    export.register_namedtuple_serialization(
                        cls, serialized_name=f"dynamics.{cls.__name__}"
                    )
                except ValueError:  # already registered
                    pass
            _EXPORT_READY = True
        except ImportError:
            _EXPORT_READY = False
    return _EXPORT_READY


def _code_stamp() -> str:
    """Modification time and size of every Python file a program could depend on: all of the
    library and the sweep configs (dynamics/, sweeps/), and every loaded module outside the
    standard library, site-packages and this project (a user's own models). Installed
    libraries enter a program's key through their versions."""
    import hashlib
    import sys
    import sysconfig

    installed = tuple(
        os.path.realpath(sysconfig.get_paths()[k])
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
    )
    project = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    files = set()
    for package in ("dynamics", "sweeps"):
        for root, _, names in os.walk(os.path.join(project, package)):
            files.update(os.path.join(root, n) for n in names if n.endswith(".py"))
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f and f.endswith(".py"):
            f = os.path.realpath(f)
            if not f.startswith(installed) and not f.startswith(project + os.sep):
                files.add(f)
    h = hashlib.sha256()
    for f in sorted(files):
        try:
            st = os.stat(f)
        except OSError:
            continue
        h.update(f"{os.path.relpath(f, project)}:{st.st_mtime_ns}:{st.st_size};".encode())
    return h.hexdigest()


def _native_kernel() -> str | None:
    """The compiled spectral kernel a traced program calls (its library file), or None when
    it is unavailable and the program calls LAPACK instead."""
    from dynamics import native

    return native.status()["path"] if native.available() else None


def program_key(p: Plan, group: Group, n_pad: int, code: str | None = None) -> str:
    """What determines a group's program: the spec's code and settings, the group's static point
    and batch, the padding, the devices, the versions and the code loaded in this process
    (`code`: a `_code_stamp()` already taken, since it reads every loaded module's file)."""
    import hashlib
    import json

    import jax

    blob = json.dumps(
        {
            "source": p.res.sweep.source,
            "settings": p.res.settings,
            "point": group.point,
            "batch": group.spec.batch,
            "n_pad": n_pad,
            "devices": [d.device_kind for d in jax.local_devices()],
            "versions": package_versions(),
            "code": code if code is not None else _code_stamp(),
            "native": _native_kernel() if _uses_native(group.spec) else None,
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def slot_order(n_pad: int, n_dev: int) -> np.ndarray:
    """Which run (in C order over a chunk's region) each of the n_pad slots of a sharded call
    holds: device d's slots hold runs d, d + n_dev, d + 2 n_dev, ..., so runs that cost more (a
    masked batch costs what its true size does) are spread over the devices instead of
    falling to one of them in a block."""
    per = n_pad // n_dev
    s = np.arange(n_pad)
    return (s % per) * n_dev + s // per


def chunk_inputs(p: Plan, chunk: Chunk, n_pad: int, n_dev: int):
    """Hparams and seeds of a chunk's runs, in C order over its region, padded to n_pad and
    placed in `slot_order`."""
    import jax.numpy as jnp

    from dynamics.steps import Hparams

    grid_axes = p.res.grid_axes
    offset = len(p.res.static_axes)
    ranges = [range(s.start, s.stop) for s in chunk.region[offset:]]
    rows = [
        {a: p.coords[a][i] for a, i in zip(grid_axes, idx, strict=True)}
        for idx in itertools.product(*ranges)
    ]
    n = len(rows)
    rows = rows + [rows[-1]] * (n_pad - n)
    rows = [rows[i] for i in slot_order(n_pad, n_dev)]
    fields = {}
    for f in Hparams._fields:
        default = getattr(Hparams(), f)
        if f == "batch_size" and f not in grid_axes:
            default = 0
        vals = [r.get(f, default) for r in rows]
        fields[f] = jnp.asarray(vals, jnp.int32 if f == "batch_size" else jnp.float32)
    seeds = jnp.asarray([r["seed"] for r in rows], jnp.uint32)
    return Hparams(**fields), seeds, n


def _region_shape(region: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in region)


def chunk_values(p: Plan, chunk: Chunk, trace: dict, n: int, n_dev: int) -> dict[str, np.ndarray]:
    """Device results of a chunk (in `slot_order`), reshaped to its region and padded to the
    store's layer/sv."""
    shape = _region_shape(chunk.region)
    out = {}
    n_pad = int(np.shape(trace["status"])[0])
    slot_of_run = np.argsort(slot_order(n_pad, n_dev))[:n]
    for name in p.dims:
        v = np.asarray(trace[name])[slot_of_run]
        v = v.reshape(shape + v.shape[1:])
        dims = p.dims[name]
        want = [p.sizes[d] for d in dims]
        pads = [(0, 0)] * len(shape) + [
            (0, w - s) for w, s in zip(want, v.shape[len(shape) :], strict=True)
        ]
        if any(b for _, b in pads):
            v = np.pad(v, pads, constant_values=np.nan)
        out[name] = v
    return out


@dataclasses.dataclass
class Summary:
    url: str
    runs: int
    runs_now: int
    runs_resumed: int
    diverged: int
    compile_seconds: float
    run_seconds: float
    programs: int
    devices: int
    device_kind: str
    processes: int
    dead: int = 0


def execute(
    res: Resolved,
    specs: list,
    url: str,
    *,
    fresh: bool = False,
    chunk_runs: int | None = None,
    dist: Distributed | None = None,
    progress: bool = True,
) -> Summary:
    """Run a resolved sweep into the store at `url` (creating, resuming or refusing it)."""
    import jax
    from jax.sharding import Mesh

    dist = dist or Distributed()
    url = _store.normalize(url)
    fp = res.fingerprint()
    lock = None
    if dist.index == 0:
        lock = _store.Lock(url)
        lock.acquire()
    try:
        if dist.index == 0:
            try:
                if fresh:
                    _store.remove(url)
                layout = None
                if _store.exists(url):
                    attrs = _store.read_attrs(url)
                    if "fingerprint" not in attrs:
                        _store.remove(url)  # a creation that was cut off: nothing was written yet
                    elif attrs["fingerprint"] != fp:
                        raise _store.StoreError(
                            f"--out: {url} holds a different sweep spec "
                            f"({attrs.get('sweep')}, fingerprint {attrs['fingerprint']} != {fp}); "
                            "use --fresh to overwrite it or choose another --out"
                        )
                    else:
                        import json

                        layout = json.loads(attrs["layout"])
                p = plan(res, specs, chunk_runs, layout)
                if layout is None:
                    create_store(url, p, dist)
                dist.put("dynamics/store", "ok")
            except Exception as e:
                dist.put("dynamics/store", f"error: {e}")
                raise
        else:
            msg = dist.get("dynamics/store")
            if msg != "ok":
                raise _store.StoreError(msg.removeprefix("error: "))
            import json

            p = plan(res, specs, layout=json.loads(_store.read_attrs(url)["layout"]))

        writer = _store.Writer(url)
        done = writer.done_chunks()
        mine = [c for c in p.chunks if c.id % dist.count == dist.index]
        todo = [c for c in mine if not done[c.id]]
        mesh = Mesh(np.asarray(jax.local_devices()), ("runs",))
        runs_mine = sum(math.prod(_region_shape(c.region)) for c in mine)
        runs_now = sum(math.prod(_region_shape(c.region)) for c in todo)
        # Compile every program this process needs first, so compile_seconds and run_seconds
        # are separate measurements (run time is never hidden under compilation).
        t_compile = time.perf_counter()
        inputs, n_programs = prepare(p, todo, mesh, _code_stamp() if todo else None)
        compile_s = time.perf_counter() - t_compile
        bar = _progress_bar(runs_now, progress and dist.index == 0, res.sweep.name)
        diverged = dead = 0
        t_start = time.perf_counter()
        pending = None  # (chunk, trace, n): one chunk in flight while the previous one is written
        for item in inputs + [None]:
            launched = None
            if item is not None:
                c, prog, hp, seeds, n = item
                launched = (c, prog(hp, seeds), n)
            if pending is not None:
                pc, ptrace, pn = pending
                values = chunk_values(p, pc, ptrace, pn, len(mesh.devices.flat))
                writer.write_chunk(pc.id, pc.region, values)
                diverged += int(np.sum(values["status"] == 1))
                bar.update(pn)
                bar.set_postfix(diverged=diverged, refresh=False)
            pending = launched
        bar.close()
        run_s = time.perf_counter() - t_start
        if dist.count > 1:
            dist.put(f"dynamics/stats/{dist.index}", f"{compile_s} {run_s} {diverged} {runs_now}")
            dist.barrier("dynamics/done")
        total_compile, total_run = compile_s, run_s
        if dist.index == 0:
            if dist.count > 1:
                stats = [dist.get(f"dynamics/stats/{i}").split() for i in range(dist.count)]
                total_compile = sum(float(s[0]) for s in stats)
                total_run = max(float(s[1]) for s in stats)
                runs_now = sum(int(s[3]) for s in stats)
            attrs = _store.read_attrs(url)
            statuses = _all_status(url)
            diverged = int(np.sum(statuses == 1))
            dead = int(np.sum(statuses == 2))
            complete = bool(np.all(writer.done_chunks()))
            writer.set_attrs(
                compile_seconds=float(attrs.get("compile_seconds", 0.0)) + total_compile,
                run_seconds=float(attrs.get("run_seconds", 0.0)) + total_run,
                complete=complete,
                diverged=diverged,
                dead=dead,
                finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
        runs = math.prod(p.shape)
        return Summary(
            url,
            runs,
            runs_now,
            runs_mine - runs_now if dist.count == 1 else runs - runs_now,
            diverged,
            total_compile,
            total_run,
            n_programs,
            len(jax.devices()),
            jax.local_devices()[0].device_kind,
            dist.count,
            dead,
        )
    finally:
        if lock is not None:
            lock.release()


def _all_status(url: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(url, mode="r")["status"][...])


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool, name: str):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", desc=name, smoothing=0.1, dynamic_ncols=True)
