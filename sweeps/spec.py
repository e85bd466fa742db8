"""Sweep specs: immutable data naming a run, its static settings and its grids.

A config module `sweeps/configs/NAME.py` defines

    SWEEP = Sweep(
        name="NAME", description="one line for `python -m sweeps list`",
        build=build,                      # build(**settings) -> dynamics.RunSpec
        settings=dict(steps=2000, record_every=100, width=64, depth=4),
        grid=dict(seed=[0, 1], lr=[0.05, 0.1], batch_size=[16, 128], weight_decay=[0, 1e-3]),
        static=dict(depth=[4, 8]),        # optional: one compile per value, stored as axes
        scales=dict(paper=dict(width=512, seed=list(range(5)))),   # optional presets
        keep_params=None,                 # optional: final states in the store (None: if small)
    )

`grid` axes are traced (`Hparams` fields plus `seed`): a new value never recompiles.
`static` axes are settings that take several values: each value is its own program.
`--set key=v1,v2` overrides any of them; giving a setting several values makes it a static
axis, and an axis declared in `static` stays one (a dimension of the store) even when given a
single value. Everything is checked here, before anything is compiled or written.

Identity of a sweep (`Resolved.fingerprint`, and what a store compares when it grows): its
name, its resolved settings, static and grid values, its batch strategy, and its code in a
normalized form (`code_parts`: each top-level definition's syntax tree, without docstrings,
comments or formatting, and without the data arguments of `Sweep(...)`, which are compared as
resolved values), so an edit that changes no number is not a change.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dynamics.steps import HPARAM_FIELDS

# seed, lr, weight_decay, batch_size, momentum, init_scale; stack_depth is the runner's own
# (a run's depth when runs of several depths share one program, `Sweep.depth_strategy`)
GRID_AXES = ("seed",) + tuple(f for f in HPARAM_FIELDS if f not in ("stack_depth", "width"))
STORE_ORDER = ("seed", "lr", "batch_size", "weight_decay", "momentum", "init_scale")
INT_AXES = {"seed", "batch_size"}
BATCH_STRATEGIES = ("auto", "bucket", "mask")
DEPTH_STRATEGIES = ("auto", "mask", "program")
# Sweep(...) arguments that are data, compared as resolved values rather than as code; a
# description or the keep_params choice changes no number.
SWEEP_DATA_ARGS = ("name", "description", "settings", "grid", "static", "scales", "keep_params")
KEEP_CHOICES = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class SpecError(ValueError):
    """A sweep that cannot run: the message names the field and the reason, on one line."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    build: Callable[..., Any]
    settings: Mapping[str, Any]
    grid: Mapping[str, Sequence]
    static: Mapping[str, Sequence] = dataclasses.field(default_factory=dict)
    scales: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    batch_strategy: str = "auto"
    source: str = ""
    # How static points whose models differ only in the depth of a uniform stack share
    # programs: "mask" (one program at the deepest, each run cut to its depth), "program" (one
    # per depth) or "auto" (masking when it wastes little; `sweeps.plan.choose_mask_axis`).
    depth_strategy: str = "auto"
    # The same for static points whose models differ only in their hidden width
    # (`dynamics.models.Width`): one program at the widest, each run at its width, or one per
    # width (`sweeps.plan.choose_mask_axis`). A program masks one axis, depth or width.
    width_strategy: str = "auto"
    # Final run states (parameters, optimizer and model state) kept in the store: True, False,
    # or None (kept when they total at most `sweeps.plan.KEEP_STATE_AUTO_BYTES`).
    keep_params: bool | None = None


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A sweep with every override applied and checked: what the runner executes."""

    sweep: Sweep
    settings: dict[str, Any]  # scalar settings (static axes excluded)
    static: dict[str, list]  # static axes, in order
    grid: dict[str, list]  # traced axes in store order (seed, lr, batch_size, weight_decay, ...)
    scale: str
    batch_strategy: str
    keep_params: bool | None = None
    depth_strategy: str = "auto"
    width_strategy: str = "auto"

    @property
    def static_axes(self) -> list[str]:
        return list(self.static)

    @property
    def grid_axes(self) -> list[str]:
        return list(self.grid)

    @property
    def n_runs(self) -> int:
        return math.prod(len(v) for v in self.static.values()) * math.prod(
            len(v) for v in self.grid.values()
        )

    def static_points(self) -> list[dict[str, Any]]:
        keys = list(self.static)
        return [
            dict(zip(keys, vals, strict=True)) for vals in itertools.product(*self.static.values())
        ]

    def settings_for(self, point: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.settings, **point}

    def code(self) -> dict[str, str]:
        """The normalized code of the sweep's config (`code_parts`)."""
        return code_parts(self.sweep.source)

    def fingerprint(self) -> str:
        """What the store's numbers depend on in the config: name, code (normalized),
        settings, static and grid values, batch strategy."""
        blob = json.dumps(
            {
                "name": self.sweep.name,
                "code": self.code(),
                "settings": self.settings,
                "static": self.static,
                "grid": self.grid,
                "batch_strategy": self.batch_strategy,
            },
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.sweep.name,
            "scale": self.scale,
            "settings": self.settings,
            "static": self.static,
            "grid": self.grid,
            "batch_strategy": self.batch_strategy,
            "depth_strategy": self.depth_strategy,
            "width_strategy": self.width_strategy,
            "keep_params": self.keep_params,
        }


# --------------------------------------------------------------------------- identity


def code_parts(source: str) -> dict[str, str]:
    """{top-level name: digest of its normalized syntax tree} of a config's source.

    Normalized: docstrings dropped (module, class and function), comments and formatting gone
    (they are not in the tree), and the data arguments of every `Sweep(...)` call
    (`SWEEP_DATA_ARGS`) removed: those are compared as resolved values. Imports are one part,
    "imports"; other statements are named by what they define ("<statement k>" otherwise).
    An unparsable source is one part, its text."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {"source": hashlib.sha256(source.encode()).hexdigest()[:16]}
    _Normalize().visit(tree)
    parts: dict[str, list[str]] = {}
    for k, node in enumerate(tree.body):
        parts.setdefault(_part_name(node, k), []).append(ast.dump(node))
    return {n: hashlib.sha256("\n".join(d).encode()).hexdigest()[:16] for n, d in parts.items()}


def _part_name(node: ast.stmt, k: int) -> str:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return "imports"
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return ", ".join(names) if names else f"<statement {k + 1}>"


class _Normalize(ast.NodeTransformer):
    def _drop_docstring(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        return node

    def visit_Module(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:]
        node.body = [b for b in node.body if not (isinstance(b, ast.Expr) and _is_str(b.value))]
        return node

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        return self._drop_docstring(node)

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name == "Sweep":
            node.keywords = [kw for kw in node.keywords if kw.arg not in SWEEP_DATA_ARGS]
        return node


def _is_str(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


# --------------------------------------------------------------------------- discovery


def config_names() -> list[str]:
    import sweeps.configs as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def config_files(directory: str) -> list[Path]:
    """The .py files of a directory that define `SWEEP = ...` at top level (read, not run)."""
    d = Path(directory)
    if not d.is_dir():
        raise SpecError(f"dir: {directory!r} is not a directory")
    out = []
    for path in sorted(d.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError, OSError):
            out.append(path)  # let loading it say what is wrong
            continue
        if any(_part_name(node, 0) == "SWEEP" for node in tree.body):
            out.append(path)
    return out


def load_sweep(name: str) -> Sweep:
    """The SWEEP of sweeps/configs/NAME.py, or of a path to a .py file."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise SpecError(f"sweep: no such file {name!r}")
        modspec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
        module = importlib.util.module_from_spec(modspec)
        modspec.loader.exec_module(module)
    else:
        names = config_names()
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(names)}"
            raise SpecError(f"sweep: unknown sweep {name!r}{extra}")
        module = importlib.import_module(f"sweeps.configs.{name}")
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise SpecError(f"sweep: {name!r} defines no SWEEP = Sweep(...)")
    return dataclasses.replace(sweep, source=inspect.getsource(module))


# --------------------------------------------------------------------------- parsing


def _parse_scalar(key: str, text: str, like: Any):
    text = text.strip()
    try:
        if isinstance(like, bool):
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(like, int):
            f = float(text)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if isinstance(like, float):
            return float(text)
        if like is None:
            for cast in (int, float):
                try:
                    return cast(text)
                except ValueError:
                    pass
            return None if text.lower() == "none" else text
        if isinstance(like, str):
            return None if text.lower() == "none" else text
        if isinstance(like, tuple | list):
            return tuple(_parse_scalar(key, t, like[0] if like else 0.0) for t in text.split(":"))
    except ValueError:
        pass
    kind = {bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(like), type(like).__name__
    )
    raise SpecError(f"{key}: expected {kind}, got {text!r}")


def _parse_values(key: str, text: str, like: Any) -> list:
    if not text.strip():
        raise SpecError(f"{key}: no value given")
    if isinstance(like, int) and not isinstance(like, bool) and ":" in text and "," not in text:
        a, b = (_parse_scalar(key, t, 0) for t in text.split(":", 1))
        return list(range(a, b))
    return [_parse_scalar(key, t, like) for t in text.split(",")]


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise SpecError(f"--set: expected key=value[,value...], got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


def _unknown(key: str, known: Sequence[str]) -> SpecError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(sorted(known))}"
    return SpecError(f"{key}: unknown key{extra}")


def resolve(sweep: Sweep, overrides: Sequence[tuple[str, str]] = ()) -> Resolved:
    """Apply `scale=` and `key=values` overrides to a sweep and check the types and ranges."""
    settings = dict(sweep.settings)
    static = {k: list(v) for k, v in sweep.static.items()}
    grid = {k: list(v) for k, v in sweep.grid.items()}
    for k in grid:
        if k not in GRID_AXES:
            raise SpecError(f"grid: {k!r} is not a traced axis ({', '.join(GRID_AXES)})")
    for k in static:
        if k not in settings:
            raise SpecError(f"static: {k!r} must also be a key of settings (its default)")
    batch_strategy = sweep.batch_strategy
    depth_strategy = sweep.depth_strategy
    width_strategy = sweep.width_strategy
    keep_params = sweep.keep_params
    declared = set(sweep.static)
    overrides = list(overrides)
    scale = "default"
    for k, v in overrides:
        if k == "scale":
            scale = v.strip()
    if scale != "default":
        if scale not in sweep.scales:
            known = ", ".join(["default", *sweep.scales]) or "default"
            raise SpecError(f"scale: unknown scale {scale!r}; this sweep has: {known}")
        for k, v in sweep.scales[scale].items():
            if k in GRID_AXES:
                grid[k] = list(v)
            elif k in static or (isinstance(v, list) and k in settings):
                static[k] = list(v)
            elif k in settings:
                settings[k] = v
            elif k == "batch_strategy":
                batch_strategy = v
            elif k == "depth_strategy":
                depth_strategy = v
            elif k == "width_strategy":
                width_strategy = v
            elif k == "keep_params":
                keep_params = v
            else:
                raise SpecError(f"scales.{scale}: unknown key {k!r}")
    known = [
        *GRID_AXES,
        *settings,
        "scale",
        "batch_strategy",
        "depth_strategy",
        "width_strategy",
        "keep_params",
    ]
    for k, text in overrides:
        if k == "scale":
            continue
        if k == "batch_strategy":
            batch_strategy = text.strip()
        elif k == "depth_strategy":
            depth_strategy = text.strip()
        elif k == "width_strategy":
            width_strategy = text.strip()
        elif k == "keep_params":
            t = text.strip().lower()
            if t not in (*KEEP_CHOICES, "auto", "none"):
                raise SpecError(f"keep_params: expected true, false or auto, got {text!r}")
            keep_params = KEEP_CHOICES.get(t)
        elif k in GRID_AXES:
            like = 0 if k in INT_AXES else 0.0
            grid[k] = _parse_values(k, text, like)
        elif k in settings:
            like = static[k][0] if k in static else settings[k]
            values = _parse_values(k, text, like)
            if len(values) > 1 or k in declared:
                # an axis the sweep declares static stays a dimension of the store, of length
                # one if need be, so stores of one value and of several line up
                static[k] = values
            else:
                static.pop(k, None)
                settings[k] = values[0]
        else:
            raise _unknown(k, known)
    if keep_params not in (None, True, False):
        raise SpecError(f"keep_params: expected True, False or None, got {keep_params!r}")
    if batch_strategy not in BATCH_STRATEGIES:
        raise SpecError(
            f"batch_strategy: must be one of {BATCH_STRATEGIES}, got {batch_strategy!r}"
        )
    if depth_strategy not in DEPTH_STRATEGIES:
        raise SpecError(
            f"depth_strategy: must be one of {DEPTH_STRATEGIES}, got {depth_strategy!r}"
        )
    if width_strategy not in DEPTH_STRATEGIES:
        raise SpecError(
            f"width_strategy: must be one of {DEPTH_STRATEGIES}, got {width_strategy!r}"
        )
    for k in static:
        settings.pop(k, None)
    grid.setdefault("seed", [0])
    full = {}
    for k in STORE_ORDER:
        if k in grid:
            full[k] = grid[k]
        elif k in ("lr", "batch_size", "weight_decay"):
            full[k] = None  # filled from the run spec's defaults
    _check_grid(full)
    for k, v in static.items():
        if len(set(map(repr, v))) != len(v):
            raise SpecError(f"{k}: repeated values {v}")
    return Resolved(
        sweep,
        settings,
        static,
        full,
        scale,
        batch_strategy,
        keep_params,
        depth_strategy,
        width_strategy,
    )


def _check_grid(grid: dict[str, list | None]) -> None:
    for k, vals in grid.items():
        if vals is None:
            continue
        if not vals:
            raise SpecError(f"{k}: empty list of values")
        if len(set(vals)) != len(vals):
            raise SpecError(f"{k}: repeated values {vals}")
        for v in vals:
            if k in INT_AXES and (isinstance(v, bool) or not isinstance(v, int)):
                raise SpecError(f"{k}: expected integers, got {v!r}")
            if k not in INT_AXES and not isinstance(v, int | float):
                raise SpecError(f"{k}: expected numbers, got {v!r}")
            if not math.isfinite(v):
                raise SpecError(f"{k}: must be finite, got {v!r}")
        if k == "lr" and min(vals) <= 0:
            raise SpecError(f"lr: must be positive, got {min(vals)}")
        if k == "weight_decay" and min(vals) < 0:
            raise SpecError(f"weight_decay: must be non-negative, got {min(vals)}")
        if k == "batch_size" and min(vals) < 1:
            raise SpecError(f"batch_size: must be at least 1, got {min(vals)}")
        if k == "seed" and min(vals) < 0:
            raise SpecError(f"seed: must be non-negative, got {min(vals)}")
        if k == "momentum" and not all(0 <= v < 1 for v in vals):
            raise SpecError(f"momentum: must lie in [0, 1), got {vals}")
        if k == "init_scale" and min(vals) <= 0:
            raise SpecError(f"init_scale: must be positive, got {min(vals)}")


def build_specs(res: Resolved) -> list[tuple[dict[str, Any], Any]]:
    """Build the RunSpec of every static point and finish checking against it.

    Fills unset grid axes from the spec (batch_size: the spec's batch; lr and weight_decay
    must be given), and checks batch sizes against the data and the record schedule.
    Bad input raised by build() (ValueError, such as dynamics.data.DataError, or a missing
    file) becomes a one-line SpecError; any other exception is a bug in the config's code and
    propagates with its traceback. A spec of precision "float64" turns on JAX's 64-bit mode
    (`jax_enable_x64`) for this process before it is validated: it then holds for every
    program the process traces.
    """
    from dynamics.train import RunSpec

    params = inspect.signature(res.sweep.build).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = []
    for point in res.static_points() or [{}]:
        kwargs = res.settings_for(point)
        if not accepts_any:
            extra = [k for k in kwargs if k not in params]
            if extra:
                raise SpecError(f"{extra[0]}: not an argument of {res.sweep.name}'s build()")
        try:
            spec = res.sweep.build(**kwargs)
        except SpecError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise SpecError(f"{_first_line(e)}") from e
        if not isinstance(spec, RunSpec):
            raise SpecError(f"build: {res.sweep.name}'s build() must return a dynamics.RunSpec")
        if getattr(spec, "precision", "float32") == "float64":
            import jax

            if not jax.config.jax_enable_x64:
                jax.config.update("jax_enable_x64", True)
        if spec.batch is None and spec.sampling != "full" and res.grid["batch_size"]:
            # the static batch of a sweep is its largest batch size (the runner masks or
            # groups the smaller ones)
            spec = dataclasses.replace(spec, batch=int(max(res.grid["batch_size"])))
        try:
            spec.validate()
        except ValueError as e:
            raise SpecError(_first_line(e)) from e
        n = int(spec.data.x_train.shape[0])
        if spec.sampling == "full":
            if res.grid["batch_size"] not in (None, [n]):
                raise SpecError(f"batch_size: this sweep trains on the full batch of {n} examples")
            res.grid["batch_size"] = [n]
        else:
            if res.grid["batch_size"] is None:
                res.grid["batch_size"] = [spec.static_batch]
            big = max(res.grid["batch_size"])
            if big > n:
                raise SpecError(f"batch_size: {big} exceeds the {n} training examples")
        out.append((point, spec))
    for k in ("lr", "weight_decay"):
        if res.grid[k] is None:
            if k == "weight_decay":
                res.grid[k] = [0.0]
            else:
                raise SpecError("lr: the sweep gives no learning rate (set lr=...)")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
