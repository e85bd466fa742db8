"""Every code block of the README runs as written: the Python blocks are executed (those that
read results/default.zarr against a default sweep run here at 100 steps), every `python -m
sweeps` command line is run through the CLI (`run` lines as --dry-run: every check, no
compilation; `list`, `show`, `plot` and `report` for real), and every `make` target it names
exists."""

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    """The README's fenced blocks of a language ("" for bare fences), in order."""
    out, current, inside = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == lang:
                    out.append("\n".join(current) + "\n")
                inside = None
        elif inside is not None:
            current.append(line)
    return out


def _python(i: int) -> str:
    return blocks("python")[i]


def test_the_readme_has_the_blocks_this_test_runs():
    py = blocks("python")
    assert len(py) == 5, "update this test's block indices"
    assert "make_run" in py[0] and "Observable" in py[1] and "SWEEP = Sweep" in py[2]
    assert "load_params" in py[3] and "open_zarr" in py[4]


@pytest.fixture(scope="module")
def scope():
    return {}


def test_use_it_in_your_own_jax_code(scope, capsys):
    exec(compile(_python(0), "README.md", "exec"), scope)
    trace = scope["trace"]
    acc = np.asarray(trace["test_accuracy"][:, -1])
    assert acc.shape == (3,) and (acc > 0.8).all()  # digits are learnt
    assert np.asarray(trace["rank"][:, -1]).shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(trace["status"]), 0)
    assert capsys.readouterr().out.count("[") >= 3


def test_the_protocol_example(scope):
    exec(compile(_python(1), "README.md", "exec"), scope)
    trace = scope["trace"]
    moved = np.asarray(trace["moved"])
    assert moved.shape == (5, 3) and (moved[0] == 0).all() and (moved[-1] > 0).all()
    assert np.isfinite(np.asarray(trace["rho_eff"])).all()
    assert int(trace["step"][-1]) == 20 * -(-1437 // 32)  # 20 epochs of 45 batches


def test_sweep_example_resolves():
    from sweeps.spec import Sweep, build_specs, parse_overrides, resolve

    scope: dict = {}
    exec(compile(_python(2), "README.md", "exec"), scope)
    sweep = scope["SWEEP"]
    assert isinstance(sweep, Sweep)
    res = resolve(sweep, parse_overrides(["steps=200", "depth=2,4"]))
    specs = build_specs(res)
    assert [p for p, _ in specs] == [{"depth": 2}, {"depth": 4}]
    assert res.n_runs == 2 * 3 * 2 * 2 * 2


@pytest.fixture(scope="module")
def default_store(tmp_path_factory):
    """The default sweep at 100 steps in a fresh directory, as results/default.zarr."""
    from sweeps import cli

    where = tmp_path_factory.mktemp("readme")
    old = os.getcwd()
    os.chdir(where)
    try:
        sets = ["--set", "steps=100", "--set", "record_every=50"]
        assert cli.main(["run", "default", "--out", "results", "--quiet", *sets]) == 0
    finally:
        os.chdir(old)
    return where


def _in(where, fn):
    old = os.getcwd()
    os.chdir(where)
    try:
        return fn()
    finally:
        os.chdir(old)


def test_results_and_params_blocks(default_store, capsys):
    scope: dict = {}
    _in(default_store, lambda: exec(compile(_python(4), "README.md", "exec"), scope))
    assert "weight_decay" in capsys.readouterr().out
    _in(default_store, lambda: exec(compile(_python(3), "README.md", "exec"), scope))
    params = scope["params"]
    assert len(params) == 4 and params[0][0]["w"].shape == (64, 64)  # the 4 weight decays


def command_lines() -> list[str]:
    lines = []
    for block in blocks(""):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def test_every_command_runs(default_store, capsys):
    from sweeps import cli

    makefile = (ROOT / "Makefile").read_text()
    ran = 0
    for line in command_lines():
        if not line.startswith(("python ", "make ")):
            continue  # the layout tree
        argv = shlex.split(line)
        if argv[0] == "make":
            assert re.search(rf"^{argv[1]}:", makefile, re.M), line
            continue
        assert argv[:3] == ["python", "-m", "sweeps"], line
        args = argv[3:]
        if args[0] == "run" and "--dry-run" not in args:
            args = [*args, "--dry-run"]
        rc = _in(default_store, lambda args=args: cli.main(args))
        assert rc == 0, (line, capsys.readouterr())
        ran += 1
    assert ran >= 7
    assert (default_store / "default_rank.png").exists()
    assert (default_store / "default_report.html").exists()
