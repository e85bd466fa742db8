"""The bench's timing schedule (no timings are asserted: only which timer runs when, and what
is kept)."""

from bench.__main__ import interleaved


def _timer(name, values, log):
    it = iter(values)

    def call():
        log.append(name)
        return next(it)

    return call


def test_interleaved_takes_parts_in_turn_and_keeps_each_parts_best():
    log = []
    timers = {
        "sweep": [_timer("s0", [3.0, 1.0, 2.0], log), _timer("s1", [5.0, 6.0, 4.0], log)],
        "peak": _timer("p", [0.5, 0.25, 0.75], log),
    }
    rounds: dict = {}
    best = interleaved(timers, repeat=3, rounds=rounds)
    # each part's best, summed: 1 + 4 for the sweep, 0.25 for the single timer
    assert best == {"sweep": 5.0, "peak": 0.25}
    # and every round's total, in order
    assert rounds == {"sweep": [8.0, 7.0, 6.0], "peak": [0.5, 0.25, 0.75]}
    # round by round, part i of every timer before part i + 1 of any
    assert log == ["s0", "p", "s1"] * 3


def test_readme_table_keeps_each_parts_latest_figures(tmp_path):
    """`--readme`: a run of one part keeps the other parts' earlier figures, and the README's
    section is the table of what is saved, each figure beside its target."""
    from bench.__main__ import readme_table, save_figures, update_readme

    dev = {"kind": "cpu", "platform": "cpu", "count": 2}
    conv = {
        "device": dev,
        "conv": {
            "runs": 256,
            "fraction_of_peak": 0.27,
            "vectorized_over_loop": 1.64,
            "observables_overhead": 1.02,
        },
    }
    depth = {
        "device": dev,
        "depth_compile": {"mlp": {"stacked": {"10": 1.0, "100": 3.5, "ratio": 3.5}}},
    }
    store = tmp_path / "bench.json"
    save_figures(conv, store)
    saved = save_figures(depth, store)
    assert set(saved) == {"conv", "depth"}
    table = readme_table(saved)
    assert "| 4-layer CNN (256 runs) | useful FLOP/s / matmul peak | 27% | >= 40% |" in table
    assert "| 1.64x | >= 1.5x |" in table and "| 1.02x | <= 1.15x |" in table
    assert "| depth 10 -> 100, mlp, stacked | compile time ratio | 3.50x | <= 1.5x |" in table
    cold = {
        "device": dev,
        "sweep_cold": {
            "sweep": "channel_norm_depth",
            "programs": {"compile_seconds": 20.1, "run_seconds": 7.4, "programs": 6},
            "masked": {"error": ["boom"]},
        },
    }
    saved = save_figures(cold, store)
    assert set(saved) == {"conv", "depth", "cold"}
    table = readme_table(saved)
    assert (
        "| channel_norm_depth from nothing, programs | compile + run, 6 programs | 20.1 s + 7.4 s |"
        in table
    )
    assert "masked" not in table  # a failed measurement gives no row
    width = {
        "device": dev,
        "sweep_width": {
            "sweep": "orthogonal_init",
            "widths 64-128, masked": {"compile_seconds": 9.5, "run_seconds": 30.0, "programs": 10},
        },
    }
    saved = save_figures(width, store)
    assert set(saved) == {"conv", "depth", "cold", "width"}
    table = readme_table(saved)
    assert (
        "| orthogonal_init from nothing, widths 64-128, masked | compile + run, 10 programs "
        "| 9.5 s + 30.0 s | - |" in table
    )
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench -->\nold\n<!-- /bench -->\nb\n")
    update_readme(readme, table)
    assert readme.read_text() == f"a\n<!-- bench -->\n{table}\n<!-- /bench -->\nb\n"
