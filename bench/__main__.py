"""make bench: throughput of whole training runs, with observables, on the reference grid.

Everything is measured in this one process (except the warm-cache compile, which needs a new
process), on sweeps/configs/reference.py (256 runs; --scale N multiplies the seeds):

  runs/s        the vectorized sweep (all chunks, after compilation) and a loop of single
                jitted runs over the same grid, and their ratio;
  FLOP/s        useful FLOPs (each run's true batch size: training forward + backward and the
                evaluation passes, counted by XLA's cost analysis of one example) per second,
                against the fp32 matmul peak measured here;
  observables   the sweep with its observables against the same sweep recording loss only;
  strategies    bucketing runs by batch size against masking them at the largest size;
  compile       seconds cold (empty cache) and warm (a second process, persistent cache),
                number of XLA compilations; peak resident memory; device and versions.

Writes bench/out/bench-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--scale", type=int, default=1, help="multiply the reference grid's seeds")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--skip-loop", action="store_true", help="skip the loop of single runs")
    p.add_argument("--repeat", type=int, default=2, help="timed repetitions (best is kept)")
    args = p.parse_args(argv)
    if args.scale < 1:
        p.error("--scale must be at least 1")
    return args


def matmul_peak(jax, jnp) -> dict:
    """fp32 FLOP/s of a large square matmul, best of several."""
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return {"n": n, "seconds": best, "flops_per_s": 2 * n**3 / best}


def flops_per_example(spec) -> tuple[float, float]:
    """(training FLOPs per example per step, forward FLOPs per example) from XLA's cost model,
    as the slope between batches of 64 and 128 examples (so fixed costs cancel)."""
    import jax
    import jax.numpy as jnp

    from dynamics.steps import Batch
    from dynamics.train import make_loss_fn

    loss_fn = make_loss_fn(spec.model, spec.loss)
    params = spec.model.init(jax.random.key(0))
    x, y = spec.data.x_train, spec.data.y_train

    def cost(fn, b):
        batch = Batch(jnp.asarray(x[:b]), jnp.asarray(y[:b]), jnp.full((b,), 1.0 / b))
        ca = jax.jit(fn).lower(params, batch).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return float(ca["flops"])

    grad = jax.value_and_grad(loss_fn)
    fwd = lambda p, batch: spec.model.apply(p, batch.x, None)  # noqa: E731
    train = (cost(grad, 128) - cost(grad, 64)) / 64
    forward = (cost(fwd, 128) - cost(fwd, 64)) / 64
    return train, forward


def spectrum_methods(spec, runs: int = 64, repeat: int = 3) -> dict:
    """Seconds per run for one record's spectra of every layer, by method, on the reference
    shapes (vmapped over `runs` runs on one device)."""
    import jax

    from dynamics import observables as obs

    keys = jax.random.split(jax.random.key(0), runs)
    params = jax.vmap(spec.model.init)(keys)
    out = {}
    for method in ("svd", "gram"):
        f = jax.jit(jax.vmap(lambda p, m=method: obs.singular_values(p, method=m)))
        jax.block_until_ready(f(params))
        best = math.inf
        for _ in range(repeat):
            t = time.perf_counter()
            jax.block_until_ready(f(params))
            best = min(best, time.perf_counter() - t)
        out[method] = best / runs
    out["chosen"] = spec.spectrum_method
    return out


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


def time_vectorized(res, specs, repeat, chunk_runs=None) -> dict:
    """Run every chunk of the plan (no store), after compiling; best of `repeat`."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from sweeps import runner

    p = runner.plan(res, specs, chunk_runs)
    n_dev = len(jax.local_devices())
    mesh = Mesh(np.asarray(jax.local_devices()), ("runs",))
    n_pad = math.ceil(p.chunk_runs / n_dev) * n_dev
    programs, inputs = {}, []
    compile_s = 0.0
    for c in p.chunks:
        prog = programs.get(c.group)
        if prog is None:
            prog = programs[c.group] = runner.Program(p.groups[c.group].spec, n_pad, mesh)
        hp, seeds, n = runner.chunk_inputs(p, c, n_pad)
        if prog.compiled is None:
            prog.compile(hp, seeds)
            compile_s += prog.compile_seconds
        inputs.append((prog, hp, seeds))
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        pending = None  # as the runner does: one chunk in flight while the last is fetched
        for prog, hp, seeds in inputs:
            out = prog(hp, seeds)
            if pending is not None:
                jax.device_get(pending)
            pending = out
        jax.device_get(pending)
        best = min(best, time.perf_counter() - t)
    return {
        "seconds": best,
        "runs": res.n_runs,
        "runs_per_s": res.n_runs / best,
        "programs": len(programs),
        "chunks": len(p.chunks),
        "chunk_runs": p.chunk_runs,
        "strategy": p.strategy,
        "compile_seconds": compile_s,
    }


def time_loop(res, specs) -> dict:
    """A loop of single jitted runs over the same grid (one compile per batch size)."""
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
    grid = res.grid
    points = list(itertools.product(*grid.values()))
    keys = list(grid)

    def hp_of(pt):
        d = dict(zip(keys, pt, strict=True))
        return d, Hparams(lr=d["lr"], weight_decay=d["weight_decay"], batch_size=d["batch_size"])

    for bs, (fn, data) in fns.items():  # compile
        jax.block_until_ready(fn(Hparams(lr=0.01, batch_size=bs), jax.random.key(0), data))
    t = time.perf_counter()
    for pt in points:
        d, hp = hp_of(pt)
        fn, data = fns[d["batch_size"]]
        jax.block_until_ready(fn(hp, jax.random.key(d["seed"]), data))
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "runs": len(points), "runs_per_s": len(points) / seconds}


def warm_compile(cache: str, scale: int) -> dict:
    """A second process running the reference sweep with the persistent cache filled."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "warm.zarr")
        env = {**os.environ, "DYNAMICS_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "sweeps", "run", "reference", "--out", out, "--quiet"]
        if scale > 1:
            cmd += ["--set", f"seed=0:{4 * scale}"]
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            return {"error": r.stderr.strip().splitlines()[-1:]}
        import xarray as xr

        attrs = xr.open_zarr(out).attrs
        return {
            "compile_seconds": float(attrs["compile_seconds"]),
            "run_seconds": float(attrs["run_seconds"]),
            "process_wall_seconds": wall,
        }


def main(argv=None) -> int:
    args = _parse(argv)
    cache = tempfile.mkdtemp(prefix="dynamics-bench-cache-")
    os.environ["DYNAMICS_CACHE_DIR"] = cache
    from sweeps import runner

    runner.configure_jax()
    import jax
    import jax.numpy as jnp

    from sweeps.spec import build_specs, load_sweep, parse_overrides, resolve

    counter = CompileCounter(jax)
    sets = [f"seed=0:{4 * args.scale}"] if args.scale > 1 else []
    sweep = load_sweep("reference")
    res = resolve(sweep, parse_overrides(sets))
    specs = build_specs(res)
    print(f"[bench] reference grid: {res.n_runs} runs, {specs[0][1].steps} steps each", flush=True)

    report: dict = {"grid": res.describe(), "runs": res.n_runs}
    dev = jax.local_devices()[0]
    report["device"] = {
        "kind": dev.device_kind,
        "platform": dev.platform,
        "count": len(jax.devices()),
    }
    report["versions"] = runner.package_versions()
    report["git_commit"] = runner.git_commit()

    # 1. end to end, cold cache: the sweep as `python -m sweeps run reference` does it
    with tempfile.TemporaryDirectory() as d:
        before = counter.count
        s = runner.execute(res, specs, os.path.join(d, "ref.zarr"), progress=False)
        report["end_to_end"] = {
            "compile_seconds_cold": s.compile_seconds,
            "run_seconds": s.run_seconds,
            "runs_per_s": s.runs_now / s.run_seconds,
            "programs": s.programs,
            "xla_compilations": counter.count - before,
        }
    print(f"[bench] end to end: {report['end_to_end']}", flush=True)

    # 2. warm cache in a new process
    report["warm_compile"] = warm_compile(cache, args.scale)
    print(f"[bench] warm process: {report['warm_compile']}", flush=True)

    # 3. vectorized (compute only), the strategies, observables overhead
    report["vectorized"] = time_vectorized(res, specs, args.repeat)
    print(f"[bench] vectorized: {report['vectorized']}", flush=True)
    res_mask = resolve(sweep, parse_overrides(sets + ["batch_strategy=mask"]))
    report["vectorized_mask"] = time_vectorized(res_mask, build_specs(res_mask), args.repeat)
    print(f"[bench] vectorized, masked batches: {report['vectorized_mask']}", flush=True)
    res_loss = resolve(sweep, parse_overrides(sets + ["observables=loss"]))
    report["vectorized_loss_only"] = time_vectorized(res_loss, build_specs(res_loss), args.repeat)
    print(f"[bench] vectorized, loss only: {report['vectorized_loss_only']}", flush=True)
    report["observables_overhead"] = (
        report["vectorized"]["seconds"] / report["vectorized_loss_only"]["seconds"]
    )

    # 4. FLOP/s against the measured matmul peak
    train_ex, fwd_ex = flops_per_example(specs[0][1])
    flops = useful_flops(res, specs, train_ex, fwd_ex)
    peak = matmul_peak(jax, jnp)
    achieved = flops / report["vectorized"]["seconds"]
    report["flops"] = {
        "train_flops_per_example_step": train_ex,
        "forward_flops_per_example": fwd_ex,
        "useful_flops": flops,
        "useful_flops_per_s": achieved,
        "matmul_peak": peak,
        "fraction_of_peak": achieved / peak["flops_per_s"],
        "fraction_of_peak_loss_only": flops
        / report["vectorized_loss_only"]["seconds"]
        / peak["flops_per_s"],
    }

    report["spectrum_seconds_per_run_record"] = spectrum_methods(specs[0][1])

    # 5. the loop of single runs
    if not args.skip_loop:
        report["loop"] = time_loop(res, specs)
        report["vectorized_vs_loop"] = (
            report["vectorized"]["runs_per_s"] / report["loop"]["runs_per_s"]
        )
        print(f"[bench] loop of single runs: {report['loop']}", flush=True)

    report["xla_compilations_total"] = counter.count
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats:
        report["peak_device_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=float))
    _print_table(report)
    print(f"[bench] wrote {path}")
    return 0


def _print_table(r: dict) -> None:
    v, f = r["vectorized"], r["flops"]
    rows = [
        ("device", f"{r['device']['count']} x {r['device']['kind']} ({r['device']['platform']})"),
        (
            "grid",
            f"{r['runs']} runs, strategy {v['strategy']}, {v['programs']} programs, {v['chunks']} chunks of {v['chunk_runs']}",
        ),
        ("vectorized runs/s", f"{v['runs_per_s']:.1f}  ({v['seconds']:.2f} s)"),
        ("masked batches runs/s", f"{r['vectorized_mask']['runs_per_s']:.1f}"),
    ]
    if "loop" in r:
        rows += [
            (
                "single-run loop runs/s",
                f"{r['loop']['runs_per_s']:.2f}  ({r['loop']['seconds']:.1f} s)",
            ),
            ("vectorized / loop", f"{r['vectorized_vs_loop']:.1f}x"),
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
        ("observables overhead", f"{r['observables_overhead']:.2f}x"),
        (
            "spectra per run-record",
            "svd {:.0f} us, gram {:.0f} us (using {})".format(
                1e6 * r["spectrum_seconds_per_run_record"]["svd"],
                1e6 * r["spectrum_seconds_per_run_record"]["gram"],
                r["spectrum_seconds_per_run_record"]["chosen"],
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


if __name__ == "__main__":
    raise SystemExit(main())
