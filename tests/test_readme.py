"""The README's examples run as written."""

import re
from pathlib import Path

import numpy as np

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_it_in_your_own_jax_code(capsys):
    code = _block("## Use it in your own JAX code")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    trace = scope["trace"]
    acc = np.asarray(trace["test_accuracy"][:, -1])
    assert acc.shape == (3,) and (acc > 0.8).all()  # digits are learnt
    rank = np.asarray(trace["rank"][:, -1])
    assert rank.shape == (3, 3)
    out = capsys.readouterr().out
    assert out.count("[") >= 2


def test_sweep_example_resolves():
    from sweeps.spec import Sweep, build_specs, parse_overrides, resolve

    scope: dict = {}
    exec(compile(_block("## Sweeps"), "README.md", "exec"), scope)
    sweep = scope["SWEEP"]
    assert isinstance(sweep, Sweep)
    res = resolve(sweep, parse_overrides(["steps=200", "depth=2,4"]))
    specs = build_specs(res)
    assert [p for p, _ in specs] == [{"depth": 2}, {"depth": 4}]
    assert res.n_runs == 2 * 3 * 2 * 2 * 2
