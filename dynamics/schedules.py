"""Learning-rate schedules of static shape: multipliers of the traced learning rate.

A schedule is immutable data; `schedule(t, steps_per_epoch, total_steps)` is the factor that
multiplies `hp.lr` at step t (1-based: the step being taken), so the applied rate is
lr_t = hp.lr * factor(t) and a new `hp.lr` never recompiles. Epoch-based schedules count an
epoch as `steps_per_epoch` steps: step t lies in epoch e = (t - 1) // steps_per_epoch
(0-based), which is how PyTorch's per-epoch schedulers (`MultiStepLR`, stepped once after each
epoch) see it. Observables that divide by the learning rate (`update_size`, `effective_lr`)
use the applied rate.

    constant()                                   factor 1
    step_decay((60, 100, 200), 0.2)              factor 0.2^#{m <= e}: MultiStepLR(milestones, gamma)
    step_decay((1000,), 0.1, unit="step")        factor 0.1^#{m < t}
    cosine(final=0.0)                            final + (1 - final)(1 + cos(pi (t-1)/T)) / 2
    warmup(500, then=cosine())                   linear t / 500 for t <= 500, then `then`
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax.numpy as jnp

UNITS = ("epoch", "step")


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"schedule unit must be one of {UNITS}, got {unit!r}")


@dataclasses.dataclass(frozen=True)
class Schedule(abc.ABC):
    """Base class: factor(t, steps_per_epoch, total_steps) -> float32 scalar."""

    @abc.abstractmethod
    def __call__(self, t, steps_per_epoch: int, total_steps: int): ...

    @property
    def constant(self) -> bool:
        return False

    @property
    def needs_length(self) -> bool:
        """Whether the factor depends on the run's total length (then a longer run is not the
        continuation of a shorter one)."""
        return False


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    def __call__(self, t, steps_per_epoch, total_steps):
        return jnp.ones((), jnp.float32)

    @property
    def constant(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class StepDecay(Schedule):
    boundaries: tuple[int, ...]
    factor: float
    unit: str = "epoch"

    def __post_init__(self):
        _check_unit(self.unit)
        b = tuple(int(x) for x in self.boundaries)
        if list(b) != sorted(b) or (b and b[0] < 1):
            raise ValueError(f"step_decay boundaries must be increasing and >= 1, got {b}")
        if not self.factor > 0:
            raise ValueError(f"step_decay factor must be positive, got {self.factor}")
        object.__setattr__(self, "boundaries", b)

    def __call__(self, t, steps_per_epoch, total_steps):
        t = jnp.asarray(t, jnp.int32)
        pos = (t - 1) // steps_per_epoch if self.unit == "epoch" else t - 1
        n = sum((pos >= m).astype(jnp.int32) for m in self.boundaries) if self.boundaries else 0
        return jnp.asarray(self.factor, jnp.float32) ** jnp.asarray(n, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    final: float = 0.0

    def __call__(self, t, steps_per_epoch, total_steps):
        frac = (jnp.asarray(t, jnp.float32) - 1.0) / max(total_steps, 1)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))

    @property
    def needs_length(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class Warmup(Schedule):
    length: int
    then: Schedule = dataclasses.field(default_factory=Constant)
    unit: str = "step"

    def __post_init__(self):
        _check_unit(self.unit)
        if int(self.length) < 1:
            raise ValueError(f"warmup length must be at least 1, got {self.length}")

    def __call__(self, t, steps_per_epoch, total_steps):
        n = self.length * (steps_per_epoch if self.unit == "epoch" else 1)
        tf = jnp.asarray(t, jnp.float32)
        ramp = jnp.minimum(tf / n, 1.0)
        return jnp.where(tf <= n, ramp, self.then(t, steps_per_epoch, total_steps))

    @property
    def needs_length(self) -> bool:
        return self.then.needs_length


def constant() -> Schedule:
    """No schedule: lr_t = lr."""
    return Constant()


def step_decay(boundaries, factor: float, unit: str = "epoch") -> Schedule:
    """lr_t = lr * factor^(number of boundaries passed): at epochs (PyTorch's MultiStepLR with
    milestones `boundaries` and gamma `factor`, `scheduler.step()` called after each epoch) or
    steps. Code that calls `scheduler.step(epoch)` at the START of epochs counted from 1 (as some
    papers' code does) decays one epoch earlier: milestone m there is m - 1 here."""
    return StepDecay(tuple(boundaries), float(factor), unit)


def cosine(final: float = 0.0) -> Schedule:
    """Cosine decay over the whole run from lr to final * lr (Loshchilov & Hutter's SGDR without
    restarts): lr_t = lr (final + (1 - final)(1 + cos(pi (t - 1) / T)) / 2)."""
    return Cosine(float(final))


def warmup(length: int, then: Schedule | None = None, unit: str = "step") -> Schedule:
    """Linear warmup lr_t = lr * t / n over the first n = length steps (or epochs), then `then`."""
    return Warmup(int(length), then or Constant(), unit)


def resolve(schedule) -> Schedule:
    if schedule is None:
        return Constant()
    if not isinstance(schedule, Schedule):
        raise ValueError(
            "lr_schedule: expected a dynamics.schedules schedule (constant(), step_decay(...), "
            f"cosine(), warmup(...)), got {schedule!r}"
        )
    return schedule
