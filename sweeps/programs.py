"""Compiled programs: one group's `jit(vmap(run))` sharded over the local devices, its key in
the on-disk export cache (jax.export) and the compilation of a sweep's programs side by side."""

from __future__ import annotations

import collections
import os
import time

from sweeps.chunks import chunk_inputs, runs_per_device
from sweeps.devices import cache_dir, default_cpu_devices
from sweeps.layout import package_versions
from sweeps.plan import Group, Plan

# Compiled programs kept in this process by key (a sweep run again from Python, a store grown
# in the same session): the key names everything the program depends on (`program_key`), and
# the executable takes the data and hyperparameters as arguments.
COMPILED_KEPT = 32
_COMPILED: collections.OrderedDict = collections.OrderedDict()


class Program:
    """One group's `jit(vmap(run))`, sharded over the local devices, compiled once.

    `prog(hp, seeds)` runs n_pad runs from the beginning; with start > 0 (and the state
    `template`, sweeps.states), `prog(hp, seeds, init)` continues runs that trained `start`
    steps (or epochs) from their kept final states `init` ({leaf name: (n_pad, ...)}). With
    spec.keep_state the trace's "final_state" comes back flattened the same way."""

    def __init__(
        self,
        spec,
        n_pad: int,
        mesh,
        key: str | None = None,
        start: int = 0,
        template=None,
        stack_mask: bool = False,
        width_mask: tuple[int, ...] | None = None,
    ):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from dynamics.train import make_run, run_data
        from sweeps import states as _states

        run = make_run(spec, start=start, stack_mask=stack_mask, width_mask=width_mask)
        if start and template is None:
            raise ValueError("start: continuing runs needs their state template")

        def one(hp, seed, data, *init):
            state = template.unflatten(init[0]) if init else None
            trace = run(hp, jax.random.key(seed), data, state)
            if "final_state" in trace:
                # a dict of arrays, so the exported program's outputs need no registered types
                trace["final_state"] = _states.flatten(trace["final_state"])
            return trace

        shard = NamedSharding(mesh, P("runs"))
        repl = NamedSharding(mesh, P())
        self.data = jax.device_put(run_data(spec), repl)
        # shard_map, not jit's automatic partitioning: every device runs the vmapped program on
        # its own runs with no communication at all. (Partitioning the vmapped LAPACK calls of
        # the spectra automatically inserts cross-device collectives, which deadlock on
        # simulated CPU devices.)
        n_in = 4 if start else 3
        local = jax.shard_map(
            jax.vmap(one, in_axes=(0, 0, None, 0)[:n_in]),
            mesh=mesh,
            in_specs=(P("runs"), P("runs"), P(), P("runs"))[:n_in],
            out_specs=P("runs"),
            check_vma=False,  # runs are independent: nothing is replicated or reduced
        )
        self.fn = jax.jit(
            local, in_shardings=(shard, shard, repl, shard)[:n_in], out_shardings=shard
        )
        self.shard = shard
        self.spec = spec
        self.n_pad = n_pad
        self.key = key
        self.start = start
        self.init_shape = None
        if start:
            self.init_shape = {
                n: jax.ShapeDtypeStruct((n_pad,) + shape, dtype, sharding=shard)
                for n, shape, dtype in zip(
                    template.names, template.shapes, template.dtypes, strict=True
                )
            }
        self.compiled = None
        self.compile_seconds = 0.0

    def _args(self, hp, seeds) -> tuple:
        return (hp, seeds, self.data) + ((self.init_shape,) if self.start else ())

    def compile(self, hp, seeds) -> None:
        """Compile once. With a key, the traced and lowered program is also kept on disk
        (jax.export), so a later process skips Python tracing and lowering and only loads the
        compiled code from JAX's persistent cache."""

        with _x64(self.spec):
            self._compile(hp, seeds)

    def _compile(self, hp, seeds) -> None:
        import jax

        hp, seeds = jax.device_put((hp, seeds), self.shard)
        from dynamics import native

        t = time.perf_counter()
        native.available()  # a loaded program may call the kernels: register them
        self.compiled = _COMPILED.get(self.key) if self.key is not None else None
        # every random draw's hash as the compiled kernel: the same bits, and about a second
        # less of LLVM per draw (dynamics.native.compiled_random)
        with native.compiled_random():
            if self.compiled is None:
                self.compiled = self._load_exported(hp, seeds)
            if self.compiled is None:
                self.compiled = self._export_and_compile(hp, seeds)
        if self.key is not None:
            _COMPILED[self.key] = self.compiled
            _COMPILED.move_to_end(self.key)
            while len(_COMPILED) > COMPILED_KEPT:
                _COMPILED.popitem(last=False)
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
            return jax.jit(exp.call).lower(*self._args(hp, seeds)).compile()
        except Exception:  # a damaged or foreign file: trace again
            return None

    def _export_and_compile(self, hp, seeds):
        import jax

        path = self._path()
        if path is None or not _export_ready():
            return self.fn.lower(*self._args(hp, seeds)).compile()
        from jax import export

        from dynamics import native

        # the compiled spectral kernel is this project's own custom call (dynamics.native)
        checks = [export.DisabledSafetyCheck.custom_call(t) for t in native.TARGETS]
        exp = export.export(self.fn, disabled_checks=checks)(*self._args(hp, seeds))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(exp.serialize())
        os.replace(tmp, path)
        return jax.jit(exp.call).lower(*self._args(hp, seeds)).compile()

    def __call__(self, hp, seeds, init=None):
        if self.compiled is None:
            self.compile(hp, seeds)
        with _x64(self.spec):
            return self._call(hp, seeds, init)

    def _call(self, hp, seeds, init):
        import jax

        if self.start:
            if init is None:
                raise ValueError("init: a program that continues runs takes their states")
            hp, seeds, init = jax.device_put((hp, seeds, init), self.shard)
            return self.compiled(hp, seeds, self.data, init)
        hp, seeds = jax.device_put((hp, seeds), self.shard)
        return self.compiled(hp, seeds, self.data)


_EXPORT_READY: bool | None = None


def _x64(spec):
    """JAX's 64-bit mode as the spec needs it, for tracing and calling its program: on for
    precision float64, off otherwise, whatever the process holds (a float64 sweep turns it on
    for its process, and under it the models' inits draw float64 numbers, other than the
    float32 draws of the same keys)."""
    import jax

    return jax.enable_x64(_traced_in_x64(spec))


def _traced_in_x64(spec) -> bool:
    """Whether the spec's program is traced and called in 64-bit mode (`_x64`)."""
    return spec.precision == "float64"


def prepare(p: Plan, chunks, mesh, code: str | None = None) -> tuple[list, int]:
    """Each chunk's (chunk, program, hp, seeds, n), one `Program` per group (and start, for
    `chunks.Unit`s that continue runs), every program compiled; and the number of programs.
    chunks: `Chunk`s (all their runs from the beginning) or `Unit`s. With `code` (a
    `_code_stamp()`), programs are keyed for the on-disk export cache. Programs compile several
    at a time: XLA compiles (and loads cached executables) outside the GIL, so they compile
    side by side on the host's cores."""
    n_dev = len(mesh.devices.flat)
    n_pad = runs_per_device(p.chunk_runs, n_dev) * n_dev
    programs: dict[tuple, tuple] = {}  # (group, start) -> (program, hp, seeds of a first chunk)
    inputs = []
    for c in chunks:
        chunk = getattr(c, "chunk", c)
        start = getattr(c, "start", 0)
        hp, seeds, n = chunk_inputs(p, chunk, n_pad, n_dev, getattr(c, "runs", None))
        if (c.group, start) not in programs:
            group = p.groups[c.group]
            key = None if code is None else program_key(p, group, n_pad, code, start)
            template = p.templates.get(group.static_index) if start else None
            masked = group.stack_depths is not None
            prog = Program(
                group.spec,
                n_pad,
                mesh,
                key,
                start,
                template,
                stack_mask=masked,
                width_mask=group.widths,
            )
            programs[(c.group, start)] = (prog, hp, seeds)
        inputs.append((c, programs[(c.group, start)][0], hp, seeds, n))
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
    """The compiled kernels' library file a traced program may call (spectra, gradients, the
    random draws' hash), or None when they are unavailable and it calls LAPACK and JAX's own
    lowerings instead."""
    from dynamics import native

    return native.status()["path"] if native.available() else None


def program_key(p: Plan, group: Group, n_pad: int, code: str | None = None, start: int = 0) -> str:
    """What determines a group's program: the spec's code and settings, the group's static point
    and batch, the padding, the devices, the versions and the code loaded in this process
    (`code`: a `_code_stamp()` already taken, since it reads every loaded module's file), and
    whether it keeps final states, continues runs (`start`) or runs in 64-bit mode."""
    import hashlib
    import json

    import jax

    blob = json.dumps(
        {
            "source": p.res.sweep.source,
            "settings": p.res.settings,
            "point": group.point,
            "batch": group.spec.batch,
            **({"stack_depths": group.stack_depths} if group.stack_depths is not None else {}),
            **({"widths": group.widths} if group.widths is not None else {}),
            "n_pad": n_pad,
            "devices": [d.device_kind for d in jax.local_devices()],
            "versions": package_versions(),
            "code": code if code is not None else _code_stamp(),
            # every program may call the kernels: its random draws (compiled_random)
            "native": _native_kernel(),
            **({"keep_state": True} if group.spec.keep_state else {}),
            **({"start": start} if start else {}),
            # the mode the program is traced in (`_x64`), whatever the process's
            **({"x64": True} if _traced_in_x64(group.spec) else {}),
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
