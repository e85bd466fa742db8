"""make bench: throughput of whole training runs, with observables, on two reference grids.

Everything is measured in this one process (except the warm-cache compile, which needs a new
process), on sweeps/configs/reference.py (the dense grid: 256 runs of an MLP) and
sweeps/configs/reference_conv.py (the conv grid: 256 runs of a 4-layer CNN); --scale N
multiplies the seeds of both, --only dense|conv|depth|cold|width measures one part:

  runs/s        the vectorized sweep (all chunks, after compilation) and a loop of single
                jitted runs over the same grid, and their ratio (the loop against the
                vectorized sweep timed right after it);
  FLOP/s        useful FLOPs (each run's true batch size: training forward + backward and the
                evaluation passes, counted by XLA's cost analysis of one example) per second,
                against the fp32 matmul peak measured here;
  observables   the sweep with its observables against the same sweep recording loss only;
  strategies    the batch-size strategy the runner chose against the other one (bucketing runs
                by batch size, masking them at the largest size);
  breakdown     where the time goes: each observable group added alone to the loss-only sweep,
                the bare training loop (no records but the first and last), and one step's loss
                gradient per batch size in isolation, the compiled MLP gradient against autodiff;
  compile       seconds cold (empty cache) and warm (a second process, persistent cache),
                number of XLA compilations; peak resident memory; device and versions.
  depth         the compile time of the runner's program (4 runs vmapped, 5 SGD steps with
                gradient statistics, loss and per-layer norms recorded) at depth 10 and 100
                (a deep MLP and a deep linear 1-D conv net), the layers carried stacked (the
                default for an autodiff gradient), as a list, and (the MLP) unrolled and with
                the compiled CPU gradient kernel: the ratio depth 100 / depth 10 is the target
                (at most 1.5 stacked; --only depth).
  cold          P4's gradient sweep (sweeps/configs/channel_norm_depth.py: depths 5, 10, 30 x
                2 norms) as a user runs it from nothing: a new process, an empty cache,
                compile and run seconds, one program per depth against the depths masked into
                one program (depth_strategy), at 3000 and 300 steps, and with shifted taps, the
                convolution chosen there before XLA's was measured faster (--only cold).
  width         P9's grid (sweeps/configs/orthogonal_init.py: 2 inits x 5 depths x widths)
                the same way: one program per width against the widths masked into one program
                per depth (width_strategy), at its widths 8-128 and at 64, 96, 128
                (--only width).

The conv grid reports the same figures (under "conv" in the JSON, with its targets as
conv.fraction_of_peak, conv.vectorized_over_loop, conv.observables_overhead), except that its
useful FLOPs are counted from the model (2 x the multiply-adds of every convolution and
matrix product of one example's forward pass, training = 3 x forward, `counted_flops`), its
loop of single runs covers one seed (every lr, weight decay and batch size once: runs/s
compare per run), its warm process one seed, and its breakdown is one step's loss gradient in
each convolution formulation (`dynamics.conv`: XLA's convolution, patches and a product,
shifted taps, and the automatic choice) per batch size.

Every timed variant (and the peak matmul) is compiled first, then timed in --repeat rounds that
take each variant's chunks in turn (chunk 1 of every variant, then chunk 2, ...); each chunk's
best time is kept, so ratios compare timings taken seconds apart (the vectorized sweeps are then
timed chunk by chunk, without overlapping a chunk's run with the last one's fetch).

Writes bench/out/bench-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Observable groups of the reference grid, each timed alone on top of the loss.
BREAKDOWN = (
    ("grad_norm", "loss+grad_norm"),
    ("grad_corr", "loss+grad_corr"),
    ("spectrum", "loss+spectrum"),
)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--scale", type=int, default=1, help="multiply the reference grid's seeds")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--skip-loop", action="store_true", help="skip the loops of single runs")
    p.add_argument(
        "--only", choices=("dense", "conv", "depth", "cold", "width"), help="measure one part only"
    )
    p.add_argument(
        "--conv-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the conv grid (as `sweeps run --set`), e.g. steps=40",
    )
    p.add_argument(
        "--repeat", type=int, default=4, help="timed rounds of every variant (best is kept)"
    )
    p.add_argument(
        "--readme",
        action="store_true",
        help="also keep the measured parts in docs/bench.json and rewrite the README's table",
    )
    args = p.parse_args(argv)
    if args.scale < 1:
        p.error("--scale must be at least 1")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


class MatmulPeak:
    """Times one large fp32 square matmul per call: the machine's measured peak."""

    def __init__(self, jax, jnp):
        self.n = n = 2048 if jax.devices()[0].platform == "cpu" else 8192
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        self.args, self.f = (a, b), f

    def __call__(self) -> float:
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            self.f(*self.args).block_until_ready()
            best = min(best, time.perf_counter() - t)
        return best


def dense_forms(spec) -> dict:
    """The dense grid's loss-gradient forms: autodiff, and the compiled MLP gradient ("kernel",
    `native.dense_loss_fn`) where it applies; name -> (loss_fn, trace context)."""
    import contextlib

    from dynamics import native
    from dynamics.train import make_loss_fn

    forms = {"autodiff": (make_loss_fn(spec.model, spec.loss), contextlib.nullcontext)}
    if native.available() and native.dense_eligible(spec.model, spec.loss):
        forms["kernel"] = (native.dense_loss_fn(spec.model, spec.loss), contextlib.nullcontext)
    return forms


def conv_forms(spec) -> dict:
    """The conv grid's loss-gradient forms: autodiff of the loss with every convolution in one
    `dynamics.conv` formulation, and the automatic choice; name -> (loss_fn, trace context)."""
    import functools

    from dynamics import conv
    from dynamics.train import make_loss_fn

    loss_fn = make_loss_fn(spec.model, spec.loss)
    return {
        name: (loss_fn, functools.partial(conv.forced, name))
        for name in ("auto", *conv.FORMULATIONS)
    }


def gradient_forms(
    spec,
    train_ex: float,
    runs_per_device: int,
    batches,
    iters: int = 50,
    forms: dict | None = None,
    best_of: int = 3,
):
    """Timers (name -> (timer, useful FLOPs per call)) of one training step's loss gradient for
    every batch size and form (`forms`: name -> (loss_fn, context the step is traced in);
    default `dense_forms`: the compiled MLP gradient against autodiff of the same loss),
    vmapped over runs and sharded over the local devices as the runner does, `iters` steps in a
    scan, each call timed `best_of` times. FLOPs: `train_ex` per example and step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from dynamics.steps import Batch

    devs = jax.local_devices()
    mesh = Mesh(np.asarray(devs), ("runs",))
    n = runs_per_device * len(devs)
    forms = dense_forms(spec) if forms is None else forms
    params = jax.vmap(spec.model.init)(jax.random.split(jax.random.key(0), n))
    x_all, y_all = jnp.asarray(spec.data.x_train), jnp.asarray(spec.data.y_train)
    out = {}
    for b in batches:
        xs = jnp.stack([jnp.roll(x_all, i, axis=0)[:b] for i in range(n)])
        ys = jnp.stack([jnp.roll(y_all, i, axis=0)[:b] for i in range(n)])
        w = jnp.full((n, b), 1.0 / b, jnp.float32)
        for name, (loss_fn, context) in forms.items():
            vg = jax.value_and_grad(loss_fn)

            def loop(p, x, y, w, vg=vg):
                def body(p, _):  # a step that depends on the last, so none is hoisted
                    _, g = vg(p, Batch(x, y, w))
                    return jax.tree.map(lambda a, d: a - 1e-6 * d, p, g), None

                return lax.scan(body, p, None, length=iters)[0]

            f = jax.jit(
                jax.shard_map(
                    jax.vmap(loop),
                    mesh=mesh,
                    in_specs=P("runs"),
                    out_specs=P("runs"),
                    check_vma=False,
                )
            )
            with context():  # traced (and compiled) here, in the form's context
                jax.block_until_ready(f(params, xs, ys, w))

            def timer(f=f, xs=xs, ys=ys, w=w):
                best = math.inf
                for _ in range(best_of):
                    t = time.perf_counter()
                    jax.block_until_ready(f(params, xs, ys, w))
                    best = min(best, time.perf_counter() - t)
                return best

            out[(int(b), name)] = (timer, n * iters * b * train_ex)
    return out


def flops_per_example(spec) -> tuple[float, float]:
    """(training FLOPs per example per step, forward FLOPs per example): 2 x the multiply-adds
    of the matrix products and convolutions of the loss gradient and of the forward pass
    (`_jaxpr_flops`, which counts a scan's body times its length: XLA's cost analysis counts a
    while loop's body once, so it under-counts a model whose layers run as one `lax.scan`), as
    the slope between batches of 64 and 128 examples (so fixed costs cancel)."""
    import jax
    import jax.numpy as jnp

    from dynamics.steps import Batch
    from dynamics.train import make_loss_fn

    loss_fn = make_loss_fn(spec.model, spec.loss)
    params = spec.model.init(jax.random.key(0))
    x, y = spec.data.x_train, spec.data.y_train

    def cost(fn, b):
        batch = Batch(jnp.asarray(x[:b]), jnp.asarray(y[:b]), jnp.full((b,), 1.0 / b))
        return _jaxpr_flops(jax.make_jaxpr(fn)(params, batch).jaxpr)

    grad = jax.value_and_grad(loss_fn)
    fwd = lambda p, batch: spec.model.apply(p, batch.x, None)  # noqa: E731
    train = (cost(grad, 128) - cost(grad, 64)) / 64
    forward = (cost(fwd, 128) - cost(fwd, 64)) / 64
    return train, forward


def _jaxpr_flops(jaxpr) -> float:
    """2 x the multiply-adds of the convolutions and matrix products of a jaxpr (sub-jaxprs
    included: calls, scans times their length, the largest branch of a cond)."""
    import jax

    def closed(v):
        return v.jaxpr if isinstance(v, jax.extend.core.ClosedJaxpr) else v

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * out * math.prod(rhs) / rhs[o_dim]
        elif name == "dot_general":
            (lhs_c, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[d] for d in lhs_c)
        elif name == "cond":
            total += max(_jaxpr_flops(closed(b)) for b in eqn.params["branches"])
        else:
            subs = [
                closed(v)
                for v in eqn.params.values()
                if isinstance(v, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr)
            ]
            n = eqn.params.get("length", 1) if name == "scan" else 1
            total += n * sum(_jaxpr_flops(j) for j in subs)
    return total


def counted_flops(spec) -> tuple[float, float]:
    """(training FLOPs per example per step, forward FLOPs per example) counted from the model:
    forward = 2 x the multiply-adds of every convolution and matrix product of one example's
    forward pass, traced with XLA's convolution (`dynamics.conv.forced("xla")`), so that the
    count is the same whatever formulation computes them; training = 3 x forward (the backward
    pass's input and weight gradients: two products of the forward's size each)."""
    import jax
    import jax.numpy as jnp

    from dynamics import conv

    params = jax.eval_shape(spec.model.init, jax.random.key(0))
    x = jnp.zeros((1,) + tuple(spec.data.x_train.shape[1:]), jnp.float32)
    with conv.forced("xla"):
        jaxpr = jax.make_jaxpr(lambda p, x: spec.model.apply(p, x, None))(params, x)
    forward = _jaxpr_flops(jaxpr.jaxpr)
    return 3 * forward, forward


def conv_layers(spec) -> list[dict]:
    """Every convolution of the spec's model at its training batch: shapes, stride, padding
    and the formulation it computes with on the CPU (`dynamics.conv.calls`)."""
    import jax
    import jax.numpy as jnp

    from dynamics import conv

    params = jax.eval_shape(spec.model.init, jax.random.key(0))
    x = jnp.zeros((spec.static_batch,) + tuple(spec.data.x_train.shape[1:]), jnp.float32)
    return [c._asdict() for c in conv.calls(spec.model.apply, params, x)]


def spectrum_methods(spec, runs_per_device: int, repeat: int = 5, iters: int = 20) -> dict:
    """Microseconds per matrix of each spectral method for every layer shape of the reference
    model, the way the runner calls them (vmapped over runs, sharded over the local devices, all
    devices at once, `iters` calls in a row), and what "auto" picks; plus the seconds per run
    and record of each."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from dynamics import native
    from dynamics import observables as obs
    from dynamics.models import layer_weights

    devs = jax.local_devices()
    mesh = Mesh(np.asarray(devs), ("runs",))
    n = runs_per_device * len(devs)
    params = jax.vmap(spec.model.init)(jax.random.split(jax.random.key(0), n))
    weights = jax.vmap(layer_weights)(params)  # per layer: (runs, out, in*k*k)
    methods = ["svd", "gram"] + (["native"] if native.available() else [])
    per_shape: dict = {}
    for w in weights:
        shape = tuple(int(d) for d in w.shape[1:])
        key = "x".join(map(str, shape))
        if key in per_shape:
            per_shape[key]["layers"] += 1
            continue
        row: dict = {"layers": 1, "auto": obs.spectrum_method_for(shape)}
        for m in methods:

            def loop(x, m=m):  # calls in a row; each depends on the last, so none is hoisted
                def body(c, _):
                    return c + 0.0 * jnp.sum(obs._svals(c, m)), None

                return jax.lax.scan(body, x, None, length=iters)[0]

            f = jax.jit(
                jax.shard_map(
                    jax.vmap(loop),
                    mesh=mesh,
                    in_specs=P("runs"),
                    out_specs=P("runs"),
                    check_vma=False,
                )
            )
            jax.block_until_ready(f(w))
            best = math.inf
            for _ in range(repeat):
                t = time.perf_counter()
                jax.block_until_ready(f(w))
                best = min(best, time.perf_counter() - t)
            row[m] = 1e6 * best * len(devs) / (n * iters)  # device-seconds per matrix
        per_shape[key] = row
    totals = {m: sum(r[m] * r["layers"] for r in per_shape.values()) * 1e-6 for m in methods}
    totals["auto"] = sum(r[r["auto"]] * r["layers"] for r in per_shape.values()) * 1e-6
    return {
        "per_matrix_us": per_shape,
        "seconds_per_run_record": totals,
        "chosen": spec.spectrum_method,
    }


def useful_flops(res, specs, train_ex, fwd_ex) -> float:
    spec = specs[0][1]
    n_records = len(spec.record_steps())
    n_eval = min(spec.eval_size or spec.data.x_train.shape[0], spec.data.x_train.shape[0])
    per_bs = {
        bs: spec.steps * bs * train_ex + n_records * n_eval * fwd_ex
        for bs in res.grid["batch_size"]
    }
    others = res.n_runs // len(res.grid["batch_size"])
    return sum(per_bs.values()) * others


class CompileCounter:
    def __init__(self, jax):
        self.count = 0
        self.seconds = 0.0

        def listener(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1
                self.seconds += duration

        jax.monitoring.register_event_duration_secs_listener(listener)


class Vectorized:
    """Every chunk of a sweep's plan, compiled and ready; `once()` runs them all (no store) and
    returns the seconds, with one chunk in flight while the last is fetched, as the runner does."""

    def __init__(self, res, specs, chunk_runs=None):
        import jax
        import numpy as np
        from jax.sharding import Mesh

        from sweeps import runner

        p = runner.plan(res, specs, chunk_runs)
        mesh = Mesh(np.asarray(jax.local_devices()), ("runs",))
        t = time.perf_counter()
        inputs, n_programs = runner.prepare(p, p.chunks, mesh)
        compile_s = time.perf_counter() - t
        self.inputs = [(prog, hp, seeds) for _, prog, hp, seeds, _ in inputs]
        self.once()  # first execution (allocations, thread pools) is not timed
        self.info = {
            "runs": res.n_runs,
            "programs": n_programs,
            "chunks": len(p.chunks),
            "chunk_runs": p.chunk_runs,
            "strategy": p.strategy,
            "compile_seconds": compile_s,
        }

    def parts(self) -> list:
        """One timer per chunk (run and fetched alone): the pieces the rounds interleave."""
        import jax

        def part(prog, hp, seeds):
            t = time.perf_counter()
            jax.device_get(prog(hp, seeds))
            return time.perf_counter() - t

        return [functools.partial(part, *item) for item in self.inputs]

    def once(self) -> float:
        import jax

        t = time.perf_counter()
        pending = None
        for prog, hp, seeds in self.inputs:
            out = prog(hp, seeds)
            if pending is not None:
                jax.device_get(pending)
            pending = out
        jax.device_get(pending)
        return time.perf_counter() - t

    def result(self, seconds: float) -> dict:
        return {"seconds": seconds, "runs_per_s": self.info["runs"] / seconds, **self.info}


class Loop:
    """A loop of single jitted runs over the same grid (one compile per batch size)."""

    def __init__(self, res, specs):
        import dataclasses
        import itertools

        import jax

        from dynamics.steps import Hparams
        from dynamics.train import make_run, run_data

        spec = specs[0][1]
        fns = {}
        for bs in res.grid["batch_size"]:
            s = dataclasses.replace(spec, batch=int(bs))
            fns[bs] = (jax.jit(make_run(s)), jax.device_put(run_data(s)))
        keys = list(res.grid)
        self.calls = []
        for pt in itertools.product(*res.grid.values()):
            d = dict(zip(keys, pt, strict=True))
            hp = Hparams(lr=d["lr"], weight_decay=d["weight_decay"], batch_size=d["batch_size"])
            fn, data = fns[d["batch_size"]]
            self.calls.append((fn, hp, jax.random.key(d["seed"]), data))
        for bs, (fn, data) in fns.items():  # compile
            jax.block_until_ready(fn(Hparams(lr=0.01, batch_size=bs), jax.random.key(0), data))

    def once(self) -> float:
        import jax

        t = time.perf_counter()
        for fn, hp, key, data in self.calls:
            jax.block_until_ready(fn(hp, key, data))
        return time.perf_counter() - t

    def parts(self) -> list:
        """One timer per batch size (its runs one after another): pieces the rounds interleave."""
        import jax

        groups: dict = {}
        for call in self.calls:
            groups.setdefault(call[0], []).append(call)

        def part(calls):
            t = time.perf_counter()
            for fn, hp, key, data in calls:
                jax.block_until_ready(fn(hp, key, data))
            return time.perf_counter() - t

        return [functools.partial(part, calls) for calls in groups.values()]

    def result(self, seconds: float) -> dict:
        n = len(self.calls)
        return {"seconds": seconds, "runs": n, "runs_per_s": n / seconds}


def interleaved(timers: dict, repeat: int, rounds: dict | None = None) -> dict:
    """Best seconds of each timer over `repeat` rounds. A timer is a callable or a list of
    callables (a sweep's chunks); each round takes the first part of every timer in turn, then
    the second, and so on, and a timer's result is the sum of its parts' best times. On a shared
    machine whose speed drifts, timings taken seconds apart compare far better than timings
    taken minutes apart. `rounds`, when given, receives each timer's total of every round (a
    list of `repeat` seconds), from which the spread of a ratio can be read."""
    parts = {k: t if isinstance(t, list) else [t] for k, t in timers.items()}
    best = {k: [math.inf] * len(p) for k, p in parts.items()}
    totals = {k: [0.0] * repeat for k in parts}
    for r in range(repeat):
        for i in range(max(len(p) for p in parts.values())):
            for k, p in parts.items():
                if i < len(p):
                    t = p[i]()
                    best[k][i] = min(best[k][i], t)
                    totals[k][r] += t
    if rounds is not None:
        rounds.update(totals)
    return {k: sum(v) for k, v in best.items()}


def _sweep_process(sweep: str, cache: str, sets=(), env=None) -> dict:
    """`python -m sweeps run SWEEP --set ...` in a new process with the persistent cache
    `cache` (and `env` added to the environment), into a temporary store: its compile and run
    seconds, its number of runs and programs (the CLI's summary) and the process's wall time,
    or {"error": [last line of stderr]}."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sweep.zarr")
        env = {**os.environ, "DYNAMICS_CACHE_DIR": cache, "PYTHONPATH": str(ROOT), **(env or {})}
        cmd = [sys.executable, "-m", "sweeps", "run", sweep, "--out", out, "--quiet"]
        for item in sets:
            cmd += ["--set", item]
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            return {"error": r.stderr.strip().splitlines()[-1:]}
        import xarray as xr

        attrs = xr.open_zarr(out).attrs
        # the CLI's summary: "sweep NAME: N runs (...)" and "compile S s (P programs), ..."
        runs = re.search(r": (\d+) runs", r.stdout)
        programs = re.search(r"\((\d+) programs?\)", r.stdout)
        return {
            "compile_seconds": float(attrs["compile_seconds"]),
            "run_seconds": float(attrs["run_seconds"]),
            "programs": int(programs.group(1)) if programs else None,
            "runs": int(runs.group(1)) if runs else None,
            "process_wall_seconds": wall,
        }


def warm_compile(cache: str, sweep: str = "reference", sets=()) -> dict:
    """A second process running a sweep (with `sets`, `--set` overrides) with the persistent
    cache filled."""
    return _sweep_process(sweep, cache, sets)


COLD_SWEEP = "channel_norm_depth"  # P4's gradient sweep: 3 depths x 2 norms, 192 runs
# variant -> (environment, --set overrides): one program per depth and the depths masked into
# one program per norm, at the sweep's 3000 steps and at 300; masked with the compiled kernels
# off (JAX's own lowering of the random draws' hash: `dynamics.native.compiled_random`); and the
# shifted-taps convolution the runner chose for these single-channel convs before XLA's was
# measured faster
COLD_VARIANTS = {
    "programs": ({}, ("depth_strategy=program",)),
    "masked": ({}, ("depth_strategy=mask",)),
    "masked, kernels off": ({"DYNAMICS_NATIVE": "0"}, ("depth_strategy=mask",)),
    "programs, 300 steps": ({}, ("depth_strategy=program", "steps=300")),
    "masked, 300 steps": ({}, ("depth_strategy=mask", "steps=300")),
    "programs, taps": ({"DYNAMICS_CONV": "taps"}, ("depth_strategy=program",)),
}


WIDTH_SWEEP = "orthogonal_init"  # P9: 2 inits x 5 depths x 5 widths, 150 runs
# variant -> (environment, --set overrides): one program per width and the widths masked into
# one program per depth and init, at the sweep's widths (8 ... 128: "auto" keeps programs, 73%
# of the widest's parameters are padding on average) and at three near widths (39% padding),
# which set "auto"'s threshold (`sweeps.plan.WIDTH_WASTE_AUTO`)
WIDTH_VARIANTS = {
    "widths 8-128, programs": ({}, ("width_strategy=program",)),
    "widths 8-128, masked": ({}, ("width_strategy=mask",)),
    "widths 64-128, programs": ({}, ("width_strategy=program", "width=64,96,128")),
    "widths 64-128, masked": ({}, ("width_strategy=mask", "width=64,96,128")),
}


def sweep_cold(sweep: str = COLD_SWEEP, variants=None) -> dict:
    """The sweep as a user runs it from nothing: `python -m sweeps run` in a new process with an
    empty persistent cache, once per variant of `variants` (COLD_VARIANTS: name -> (environment,
    --set overrides)); per variant the store's compile and run seconds, its number of programs
    and the process's wall time."""
    variants = COLD_VARIANTS if variants is None else variants
    out = {"sweep": sweep}
    for name, (env, sets) in variants.items():
        with tempfile.TemporaryDirectory() as cache:
            out[name] = _sweep_process(sweep, cache, sets, env)
    return out


def _print_cold_table(d: dict, target: str = "; target: compile < 5 s") -> None:
    print(f"{d['sweep']} from nothing (new process, empty cache{target})")
    for name, row in d.items():
        if name == "sweep":
            continue
        if "error" in row:
            print(f"  {name:<24} failed: {row['error']}")
            continue
        print(
            f"  {name:<24} compile {row['compile_seconds']:6.2f} s ({row['programs']} programs), "
            f"run {row['run_seconds']:6.2f} s, total {row['compile_seconds'] + row['run_seconds']:6.2f}"
            f" s, process {row['process_wall_seconds']:6.2f} s"
        )


def end_to_end(res, specs, counter) -> dict:
    """The sweep as `python -m sweeps run` does it, into a temporary store, cold cache."""
    from sweeps import runner

    with tempfile.TemporaryDirectory() as d:
        before = counter.count
        s = runner.execute(res, specs, os.path.join(d, "sweep.zarr"), progress=False)
        return {
            "compile_seconds_cold": s.compile_seconds,
            "run_seconds": s.run_seconds,
            "runs_per_s": s.runs_now / s.run_seconds,
            "programs": s.programs,
            "xla_compilations": counter.count - before,
        }


def fractions(res, specs, train_ex, fwd_ex, best, key, peak_n, extra=()) -> dict:
    """Useful FLOPs of the sweep timed as `best[key]` and its fraction of the matmul peak
    (`best["matmul_peak"]`); `extra`: (name, (res, specs), timer key) of other variants whose
    fraction of peak is added as fraction_of_peak_<name>."""
    flops = useful_flops(res, specs, train_ex, fwd_ex)
    peak = {
        "n": peak_n,
        "seconds": best["matmul_peak"],
        "flops_per_s": 2 * peak_n**3 / best["matmul_peak"],
    }
    achieved = flops / best[key]
    out = {
        "train_flops_per_example_step": train_ex,
        "forward_flops_per_example": fwd_ex,
        "useful_flops": flops,
        "useful_flops_per_s": achieved,
        "matmul_peak": peak,
        "fraction_of_peak": achieved / peak["flops_per_s"],
    }
    for name, (r, sp), k in extra:
        out[f"fraction_of_peak_{name}"] = (
            useful_flops(r, sp, train_ex, fwd_ex) / best[k] / peak["flops_per_s"]
        )
    return out


def dense_grid(args, counter, cache, peak) -> dict:
    """The dense reference grid's figures (the report's top-level keys)."""
    import jax

    from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

    sets = [f"seed=0:{4 * args.scale}"] if args.scale > 1 else []
    sweep = load_sweep("reference")
    res = resolve(sweep, parse_overrides(sets))
    specs = build_specs(res)
    print(f"[bench] reference grid: {res.n_runs} runs, {specs[0][1].steps} steps each", flush=True)
    report: dict = {"grid": res.describe(), "runs": res.n_runs}

    # 1. end to end, cold cache: the sweep as `python -m sweeps run reference` does it
    report["end_to_end"] = end_to_end(res, specs, counter)
    print(f"[bench] end to end: {report['end_to_end']}", flush=True)

    # 2. warm cache in a new process
    report["warm_compile"] = warm_compile(cache, "reference", sets)
    print(f"[bench] warm process: {report['warm_compile']}", flush=True)

    # 3. every timed variant compiled first, then timed side by side in rounds
    def variant(*overrides):
        r = resolve(sweep, parse_overrides(sets + list(overrides)))
        return r, build_specs(r)

    steps = specs[0][1].steps
    res_bare, specs_bare = variant("observables=loss", f"record_every={steps}")
    auto = Vectorized(res, specs)
    other = "bucket" if auto.info["strategy"] == "mask" else "mask"
    prepared = {
        "vectorized": auto,
        "vectorized_other_strategy": Vectorized(*variant(f"batch_strategy={other}")),
        "vectorized_loss_only": Vectorized(*variant("observables=loss")),
        "bare_loop": Vectorized(res_bare, specs_bare),
        **{f"with {name}": Vectorized(*variant(f"observables={obs}")) for name, obs in BREAKDOWN},
    }
    print(f"[bench] compiled {len(prepared)} variants; timing", flush=True)
    timers: dict = {k: v.parts() for k, v in prepared.items()}
    timers["matmul_peak"] = peak
    per_dev = max(1, prepared["vectorized"].info["chunk_runs"] // len(jax.local_devices()))
    train_ex, fwd_ex = flops_per_example(specs[0][1])
    batches = sorted(int(b) for b in res.grid["batch_size"])
    forms = gradient_forms(specs[0][1], train_ex, per_dev, batches)
    timers.update({("form", *k): t for k, (t, _) in forms.items()})
    rounds: dict = {}
    best = interleaved(timers, args.repeat, rounds)
    for k, v in prepared.items():
        if not k.startswith("with "):
            report[k] = v.result(best[k])
    loss_s = best["vectorized_loss_only"]
    report["observables_overhead"] = best["vectorized"] / loss_s
    # the same ratio round by round (both timed seconds apart in each): how far noise moves it
    report["observables_overhead_rounds"] = [
        a / b for a, b in zip(rounds["vectorized"], rounds["vectorized_loss_only"], strict=True)
    ]
    report["breakdown"] = {
        "added_fraction": {name: best[f"with {name}"] / loss_s - 1 for name, _ in BREAKDOWN},
    }
    print(f"[bench] vectorized: {report['vectorized']}", flush=True)
    print(f"[bench] breakdown: {report['breakdown']}", flush=True)

    # 4. FLOP/s against the measured matmul peak (the best of its timings in the rounds)
    report["flops"] = fractions(
        res,
        specs,
        train_ex,
        fwd_ex,
        best,
        "vectorized",
        peak.n,
        extra=(
            ("loss_only", (res, specs), "vectorized_loss_only"),
            ("bare_loop", (res_bare, specs_bare), "bare_loop"),
        ),
    )
    report["gradient_flops_per_s"] = {}
    for (b, name), (_, form_flops) in forms.items():
        row = report["gradient_flops_per_s"].setdefault(b, {})
        row[name] = form_flops / best[("form", b, name)]
    report["spectra"] = spectrum_methods(specs[0][1], per_dev)

    # 5. the loop of single runs, timed once, against the vectorized sweep timed right after it
    if not args.skip_loop:
        loop = Loop(res, specs)
        report["loop"] = loop.result(loop.once())
        beside = prepared["vectorized"].once()
        report["vectorized_vs_loop"] = report["loop"]["seconds"] / beside
        report["vectorized_beside_loop_seconds"] = beside
        print(f"[bench] loop of single runs: {report['loop']}", flush=True)
    return report


# The conv grid's loss-gradient forms are timed at these batch sizes (XLA's convolution is slow
# enough on the CPU that every batch size would double the grid's timing rounds).
CONV_FORM_BATCHES = (8, 64)


def conv_grid(args, counter, cache, peak) -> dict:
    """The conv reference grid's figures (the report's "conv" entry), with its three targets
    as conv.fraction_of_peak, conv.vectorized_over_loop and conv.observables_overhead."""
    import jax

    from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

    sets = ([f"seed=0:{4 * args.scale}"] if args.scale > 1 else []) + list(args.conv_set)
    sweep = load_sweep("reference_conv")
    res = resolve(sweep, parse_overrides(sets))
    specs = build_specs(res)
    spec = specs[0][1]
    print(f"[bench] conv grid: {res.n_runs} runs, {spec.steps} steps each", flush=True)
    report: dict = {"grid": res.describe(), "runs": res.n_runs}

    report["end_to_end"] = end_to_end(res, specs, counter)
    print(f"[bench] conv end to end: {report['end_to_end']}", flush=True)
    # one seed: the compile is the same, the run a quarter of the grid's
    report["warm_compile"] = warm_compile(cache, "reference_conv", sets + ["seed=0"])
    print(f"[bench] conv warm process: {report['warm_compile']}", flush=True)

    def variant(*overrides):
        r = resolve(sweep, parse_overrides(sets + list(overrides)))
        return r, build_specs(r)

    prepared = {
        "vectorized": Vectorized(res, specs),
        "vectorized_loss_only": Vectorized(*variant("observables=loss")),
    }
    timers: dict = {k: v.parts() for k, v in prepared.items()}
    timers["matmul_peak"] = peak
    loop = None
    if not args.skip_loop:  # one seed: every lr, weight decay and batch size once
        loop = Loop(*variant("seed=0"))
        timers["loop"] = loop.parts()
    print("[bench] compiled the conv variants; timing", flush=True)
    per_dev = max(1, prepared["vectorized"].info["chunk_runs"] // len(jax.local_devices()))
    train_ex, fwd_ex = counted_flops(spec)
    report["layers"] = conv_layers(spec)
    batches = [b for b in CONV_FORM_BATCHES if b <= spec.data.x_train.shape[0]]
    forms = gradient_forms(
        spec, train_ex, per_dev, batches, iters=5, forms=conv_forms(spec), best_of=1
    )
    timers.update({("form", *k): t for k, (t, _) in forms.items()})
    rounds: dict = {}
    best = interleaved(timers, args.repeat, rounds)
    for k, v in prepared.items():
        report[k] = v.result(best[k])
    report["observables_overhead"] = best["vectorized"] / best["vectorized_loss_only"]
    report["observables_overhead_rounds"] = [
        a / b for a, b in zip(rounds["vectorized"], rounds["vectorized_loss_only"], strict=True)
    ]
    report["flops"] = fractions(
        res,
        specs,
        train_ex,
        fwd_ex,
        best,
        "vectorized",
        peak.n,
        extra=(("loss_only", (res, specs), "vectorized_loss_only"),),
    )
    report["fraction_of_peak"] = report["flops"]["fraction_of_peak"]
    report["gradient_flops_per_s"] = {}
    for (b, name), (_, form_flops) in forms.items():
        row = report["gradient_flops_per_s"].setdefault(b, {})
        row[name] = form_flops / best[("form", b, name)]
    print(f"[bench] conv vectorized: {report['vectorized']}", flush=True)

    # the loop of single runs over one seed, timed in the same rounds: runs/s against runs/s
    if loop is not None:
        report["loop"] = loop.result(best["loop"])
        report["vectorized_over_loop"] = (
            report["vectorized"]["runs_per_s"] / report["loop"]["runs_per_s"]
        )
        report["vectorized_over_loop_rounds"] = [
            (res.n_runs / a) / (len(loop.calls) / b)
            for a, b in zip(rounds["vectorized"], rounds["loop"], strict=True)
        ]
        print(f"[bench] conv loop of single runs: {report['loop']}", flush=True)
    return report


DEPTHS = (10, 100)


def _depth_models(depth: int, scan: bool) -> dict:
    import dynamics as dyn

    return {
        "mlp (width 32)": dyn.mlp((16,) + (32,) * (depth - 1) + (4,), scan=scan),
        "linear_conv1d (kernel 15, 1 channel)": dyn.linear_conv1d(
            depth, kernel=15, channels=1, scan=scan
        ),
    }


# how a run's layers are laid out: (stack_layers, scan, gradient)
DEPTH_LAYOUTS = {
    "stacked": (True, True, "autodiff"),  # the default for an autodiff gradient
    "list": (False, True, "autodiff"),  # params carried as a list, the stack scanned
    "unrolled": (False, False, "autodiff"),
    "mlp kernel": (True, True, "auto"),  # a plain MLP's default on the CPU: the compiled kernel
}
# measured for the MLP alone: the kernel is the MLP's; the conv net unrolled in the runner's
# program compiled 11.3 s at depth 10 and had not finished after 200 s (14.6 GB) at depth 100
MLP_ONLY_LAYOUTS = ("unrolled", "mlp kernel")
DEPTH_OBSERVABLES = ("loss", "grad_norm", "grad_cos", "layer_norm")


def depth_compile(runs: int = 4, steps: int = 5) -> dict:
    """Seconds to compile (lower + compile of a fresh function: no in-process cache is hit, and
    the persistent cache is a new empty directory) the runner's program (`make_run`: init,
    `steps` SGD steps with per-step gradient statistics, records of the loss and per-layer
    norms) of `runs` runs vmapped, at each depth of DEPTHS, in each layout of DEPTH_LAYOUTS;
    and the ratios deepest / shallowest."""
    import jax
    import jax.numpy as jnp

    import dynamics as dyn
    from dynamics.train import RunSpec, make_run

    data = {
        "mlp (width 32)": dyn.data.teacher_regression(n_train=64, n_test=0, d_in=16, d_out=4),
        "linear_conv1d (kernel 15, 1 channel)": dyn.data.signal_fitting(
            dyn.data.step_signal(64), in_channels=1
        ),
    }
    out: dict = {}
    for how, (stack, scan, gradient) in DEPTH_LAYOUTS.items():
        for depth in DEPTHS:
            for name, model in _depth_models(depth, scan).items():
                if how in MLP_ONLY_LAYOUTS and not name.startswith("mlp"):
                    continue
                d = data[name]
                spec = RunSpec(
                    model,
                    d,
                    steps=steps,
                    record_every=steps,
                    batch=16 if d.x_train.shape[0] > 1 else None,
                    sampling="permutation" if d.x_train.shape[0] > 1 else "full",
                    observables=DEPTH_OBSERVABLES,
                    stack_layers=stack,
                    gradient=gradient,
                )
                run = make_run(spec)
                hp = dyn.hparams(lr=jnp.full((runs,), 0.01))
                keys = jax.random.split(jax.random.key(0), runs)
                f = jax.jit(jax.vmap(run))
                t0 = time.perf_counter()
                f.lower(hp, keys).compile()
                sec = time.perf_counter() - t0
                out.setdefault(name, {}).setdefault(how, {})[str(depth)] = sec
    lo, hi = str(DEPTHS[0]), str(DEPTHS[-1])
    for rows in out.values():
        for row in rows.values():
            row["ratio"] = row[hi] / row[lo]
    return out


def _print_depth_table(d: dict) -> None:
    lo, hi = DEPTHS[0], DEPTHS[-1]
    print(
        f"compile of the runner's program, 4 runs x 5 SGD steps, depth {lo} -> {hi} "
        "(target: stacked ratio <= 1.5)"
    )
    for name, rows in d.items():
        for how, row in rows.items():
            print(
                f"  {name:<38} {how:<9} {row[str(lo)]:6.2f} s -> {row[str(hi)]:6.2f} s"
                f"  ratio {row['ratio']:.2f}"
            )


def main(argv=None) -> int:
    args = _parse(argv)
    cache = tempfile.mkdtemp(prefix="dynamics-bench-cache-")
    os.environ["DYNAMICS_CACHE_DIR"] = cache
    from sweeps import runner

    runner.configure_jax()
    import jax
    import jax.numpy as jnp

    counter = CompileCounter(jax)
    report: dict = {}
    dev = jax.local_devices()[0]
    report["device"] = {
        "kind": dev.device_kind,
        "platform": dev.platform,
        "count": len(jax.devices()),
    }
    report["versions"] = runner.package_versions()
    report["git_commit"] = runner.git_commit()
    peak = MatmulPeak(jax, jnp)
    if args.only in (None, "dense"):
        report.update(dense_grid(args, counter, cache, peak))
    if args.only in (None, "conv"):
        report["conv"] = conv_grid(args, counter, cache, peak)
    if args.only in (None, "depth"):
        report["depth_compile"] = depth_compile()
    if args.only in (None, "cold"):
        report["sweep_cold"] = sweep_cold()
    if args.only in (None, "width"):
        report["sweep_width"] = sweep_cold(WIDTH_SWEEP, WIDTH_VARIANTS)

    report["xla_compilations_total"] = counter.count
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats:
        report["peak_device_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=float))
    if "vectorized" in report:
        _print_table(report)
    if "conv" in report:
        _print_conv_table(report)
    if "depth_compile" in report:
        _print_depth_table(report["depth_compile"])
    if "sweep_cold" in report:
        _print_cold_table(report["sweep_cold"])
    if "sweep_width" in report:
        _print_cold_table(report["sweep_width"], "")
    print(f"[bench] wrote {path}")
    if args.readme:
        saved = save_figures(report, ROOT / "docs" / "bench.json")
        update_readme(ROOT / "README.md", readme_table(saved))
        print("[bench] kept the figures in docs/bench.json and rewrote the README's table")
    return 0


# --------------------------------------------------------------------------- README table

PARTS = ("dense", "conv", "depth", "cold", "width")


def _part_figures(report: dict, part: str) -> dict | None:
    """The figures of one measured part of a report, with where and when (None: not measured)."""
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "device": report.get("device"),
        "git_commit": report.get("git_commit"),
    }
    if part == "dense" and "vectorized" in report:
        return dict(
            meta,
            runs=report["runs"],
            fraction_of_peak=report["flops"]["fraction_of_peak"],
            vectorized_vs_loop=report.get("vectorized_vs_loop"),
            observables_overhead=report["observables_overhead"],
        )
    if part == "conv" and "conv" in report:
        c = report["conv"]
        return dict(
            meta,
            runs=c["runs"],
            fraction_of_peak=c["fraction_of_peak"],
            vectorized_vs_loop=c.get("vectorized_over_loop"),
            observables_overhead=c["observables_overhead"],
        )
    if part == "depth" and "depth_compile" in report:
        return dict(meta, ratios=report["depth_compile"])
    if part == "cold" and "sweep_cold" in report:
        return dict(meta, **report["sweep_cold"])
    if part == "width" and "sweep_width" in report:
        return dict(meta, **report["sweep_width"])
    return None


def save_figures(report: dict, path: Path) -> dict:
    """docs/bench.json: per part (dense, conv, depth) the figures of the latest run that
    measured it (a run of one part keeps the others' earlier figures). Returns what is saved."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    for part in PARTS:
        fig = _part_figures(report, part)
        if fig is not None:
            saved[part] = fig
    path.write_text(json.dumps(saved, indent=2, default=float) + "\n")
    return saved


def _ratio(x) -> str:
    return "not measured" if x is None else f"{x:.2f}x"


def readme_table(saved: dict) -> str:
    """The README's performance table from docs/bench.json's figures, each beside its target."""
    rows = ["| grid | figure | measured | target | when, where |", "|---|---|---|---|---|"]

    def where(fig):
        dev = fig.get("device") or {}
        return f"{fig['date']}, {dev.get('count', '?')} x {dev.get('kind', '?')}"

    for part, name, peak_target in (("dense", "dense MLP", 0.50), ("conv", "4-layer CNN", 0.40)):
        fig = saved.get(part)
        if fig is None:
            continue
        label = f"{name} ({fig['runs']} runs)"
        loop_target = "-" if part == "dense" else ">= 1.5x"
        obs_target = "<= 1.10x" if part == "dense" else "<= 1.15x"
        rows += [
            f"| {label} | useful FLOP/s / matmul peak | {100 * fig['fraction_of_peak']:.0f}% "
            f"| >= {100 * peak_target:.0f}% | {where(fig)} |",
            f"| {label} | vectorized / loop of single runs | "
            f"{_ratio(fig['vectorized_vs_loop'])} | {loop_target} | {where(fig)} |",
            f"| {label} | with observables / loss only | "
            f"{_ratio(fig['observables_overhead'])} | {obs_target} | {where(fig)} |",
        ]
    fig = saved.get("depth")
    if fig is not None:
        for model, rows_ in fig["ratios"].items():
            for how, row in rows_.items():
                target = "<= 1.5x" if how == "stacked" else "-"
                rows.append(
                    f"| depth 10 -> 100, {model}, {how} | compile time ratio | "
                    f"{row['ratio']:.2f}x | {target} | {where(fig)} |"
                )
    for part, target in (("cold", "compile < 5 s"), ("width", "-")):
        fig = saved.get(part)
        if fig is None:
            continue
        for name, row in fig.items():
            if not isinstance(row, dict) or "compile_seconds" not in row:
                continue
            rows.append(
                f"| {fig['sweep']} from nothing, {name} | compile + run, {row['programs']} "
                f"programs | {row['compile_seconds']:.1f} s + {row['run_seconds']:.1f} s | "
                f"{target} | {where(fig)} |"
            )
    return "\n".join(rows)


def update_readme(path: Path, table: str) -> None:
    """Replace what lies between the README's `<!-- bench -->` markers by `table`."""
    text = path.read_text()
    start, end = "<!-- bench -->", "<!-- /bench -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{path}: expected one {start} ... {end} section")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def _print_table(r: dict) -> None:
    v, f = r["vectorized"], r["flops"]
    rows = [
        ("device", f"{r['device']['count']} x {r['device']['kind']} ({r['device']['platform']})"),
        (
            "grid",
            f"{r['runs']} runs, strategy {v['strategy']}, {v['programs']} program"
            + ("" if v["programs"] == 1 else "s")
            + f", {v['chunks']} chunks of {v['chunk_runs']}",
        ),
        ("vectorized runs/s", f"{v['runs_per_s']:.1f}  ({v['seconds']:.2f} s)"),
        (
            f"{r['vectorized_other_strategy']['strategy']} strategy runs/s",
            "{:.1f}  (compile {:.1f} s, {} programs)".format(
                r["vectorized_other_strategy"]["runs_per_s"],
                r["vectorized_other_strategy"]["compile_seconds"],
                r["vectorized_other_strategy"]["programs"],
            ),
        ),
    ]
    if "loop" in r:
        rows += [
            (
                "single-run loop runs/s",
                f"{r['loop']['runs_per_s']:.2f}  ({r['loop']['seconds']:.1f} s)",
            ),
            (
                "vectorized / loop",
                f"{r['vectorized_vs_loop']:.1f}x  (vectorized timed right after the loop:"
                f" {r['vectorized_beside_loop_seconds']:.2f} s)",
            ),
        ]
    rows += [
        ("useful FLOP/s", f"{f['useful_flops_per_s'] / 1e9:.1f} GFLOP/s"),
        (
            "matmul peak",
            f"{f['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s (n={f['matmul_peak']['n']})",
        ),
        (
            "fraction of peak",
            f"{100 * f['fraction_of_peak']:.0f}%  (loss only: {100 * f['fraction_of_peak_loss_only']:.0f}%)",
        ),
        (
            "observables overhead",
            "{:.2f}x  (round by round {:.2f}-{:.2f}x)".format(
                r["observables_overhead"],
                min(r["observables_overhead_rounds"]),
                max(r["observables_overhead_rounds"]),
            ),
        ),
        *[
            (f"  + {name} alone", f"+{100 * v:.0f}%")
            for name, v in r["breakdown"]["added_fraction"].items()
        ],
        (
            "bare training loop",
            "{:.2f} s, {:.0f}% of peak (loss at the first and last step only)".format(
                r["bare_loop"]["seconds"], 100 * f["fraction_of_peak_bare_loop"]
            ),
        ),
        *[
            (
                f"loss gradient, batch {b}",
                ", ".join(
                    f"{k} {100 * v / f['matmul_peak']['flops_per_s']:.0f}%" for k, v in row.items()
                )
                + " of peak",
            )
            for b, row in r["gradient_flops_per_s"].items()
        ],
        *[
            (
                f"spectra, {shape} x{row['layers']}",
                ", ".join(f"{m} {row[m]:.0f} us" for m in ("native", "svd", "gram") if m in row)
                + f" per matrix (auto: {row['auto']})",
            )
            for shape, row in r["spectra"]["per_matrix_us"].items()
        ],
        (
            "spectra per run-record",
            ", ".join(
                f"{m} {1e6 * v:.0f} us" for m, v in r["spectra"]["seconds_per_run_record"].items()
            ),
        ),
        (
            "compile, cold",
            f"{r['end_to_end']['compile_seconds_cold']:.1f} s, {r['end_to_end']['xla_compilations']} XLA compilations",
        ),
        (
            "compile, warm process",
            f"{r['warm_compile'].get('compile_seconds', float('nan')):.2f} s",
        ),
        ("end-to-end runs/s", f"{r['end_to_end']['runs_per_s']:.1f} (with store writes)"),
        ("peak RSS", f"{r['peak_rss_mib']:.0f} MiB"),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


def _print_conv_table(report: dict) -> None:
    r = report["conv"]
    v, f = r["vectorized"], r["flops"]
    peak = f["matmul_peak"]["flops_per_s"]
    rows = [
        (
            "conv grid",
            f"{r['runs']} runs, strategy {v['strategy']}, {v['programs']} programs, "
            f"{v['chunks']} chunks of {v['chunk_runs']}",
        ),
        ("vectorized runs/s", f"{v['runs_per_s']:.1f}  ({v['seconds']:.2f} s)"),
    ]
    if "loop" in r:
        rows += [
            (
                "single-run loop runs/s",
                f"{r['loop']['runs_per_s']:.2f}  ({r['loop']['runs']} runs, "
                f"{r['loop']['seconds']:.1f} s)",
            ),
            (
                "vectorized / loop",
                "{:.2f}x  (round by round {:.2f}-{:.2f}x)".format(
                    r["vectorized_over_loop"],
                    min(r["vectorized_over_loop_rounds"]),
                    max(r["vectorized_over_loop_rounds"]),
                ),
            ),
        ]
    rows += [
        (
            "useful FLOP/s",
            f"{f['useful_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"({f['forward_flops_per_example'] / 1e6:.2f} MFLOP forward per example)",
        ),
        ("matmul peak", f"{peak / 1e9:.1f} GFLOP/s (n={f['matmul_peak']['n']})"),
        (
            "fraction of peak",
            f"{100 * f['fraction_of_peak']:.0f}%  (loss only: "
            f"{100 * f['fraction_of_peak_loss_only']:.0f}%)",
        ),
        (
            "observables overhead",
            "{:.2f}x  (round by round {:.2f}-{:.2f}x)".format(
                r["observables_overhead"],
                min(r["observables_overhead_rounds"]),
                max(r["observables_overhead_rounds"]),
            ),
        ),
        *[
            (
                f"loss gradient, batch {b}",
                ", ".join(f"{k} {100 * x / peak:.1f}%" for k, x in row.items()) + " of peak",
            )
            for b, row in r["gradient_flops_per_s"].items()
        ],
        *[
            (
                f"conv {i + 1} on the CPU",
                "{} -> {} channels, kernel {}, stride {}, {}: {}".format(
                    c["w_shape"][1],
                    c["w_shape"][0],
                    "x".join(map(str, c["w_shape"][2:])),
                    c["stride"],
                    c["padding"],
                    c["cpu"],
                ),
            )
            for i, c in enumerate(r.get("layers", []))
        ],
        (
            "compile, cold",
            f"{r['end_to_end']['compile_seconds_cold']:.1f} s, "
            f"{r['end_to_end']['xla_compilations']} XLA compilations",
        ),
        (
            "compile, warm process",
            f"{r['warm_compile'].get('compile_seconds', float('nan')):.2f} s",
        ),
        ("end-to-end runs/s", f"{r['end_to_end']['runs_per_s']:.1f} (with store writes)"),
        ("peak RSS", f"{report['peak_rss_mib']:.0f} MiB"),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


if __name__ == "__main__":
    raise SystemExit(main())
