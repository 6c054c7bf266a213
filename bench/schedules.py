"""Scalar hyperparameter schedules, evaluated at training progress t/T ∈ [0, 1] (T = total iterations).

A config value is a number (constant) or a mapping:
  {schedule: poly, start: a, end: b, power: γ}   v(t) = b + (a − b)·(1 − t/T)^γ      (CLL supplement eq. 17)
  {schedule: log, start: a, end: b}              v(t) = log((e^b − e^a)·t/T + e^a)     (GloRo's `_log_interp`)
  {schedule: log_half, start: a, end: b}         the same over the first half, then b (GloRo `logarithmic_half`)
  {schedule: linear, start: a, end: b}           v(t) = a + (b − a)·t/T
Any of them takes `until: u` ∈ (0, 1]: it reaches its end at progress u and holds it (Table B4's TRADES factor,
linear 0.5 → 20 reached at epoch 400 of 800, is {schedule: linear, start: 0.5, end: 20, until: 0.5}), and
`after: a` ∈ [0, u): it holds its start until progress a (Local-Lip-B's warm-up: ε = 0 for 20 of 800 epochs, then
a linear ramp, is {schedule: linear, start: 0, end: ε, after: 20/800, until: 419/800}).

Progress is a Python float, or a 0-d tensor where a compiled packed step (bench/pack.py) passes it as an input so
that one graph serves every step; a float gives a float, computed exactly as before.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Union

import torch

Value = Union[float, int, Mapping]


def _clamp(t, lo: float, hi: float):
    return t.clamp(lo, hi) if torch.is_tensor(t) else min(max(t, lo), hi)


def _poly(start, end, power=1.0):
    return lambda t: end + (start - end) * (1.0 - t) ** power


def _log(start, end):
    return lambda t: (torch.log if torch.is_tensor(t) else math.log)((math.exp(end) - math.exp(start)) * t
                                                                    + math.exp(start))


def _log_half(start, end):
    inner = _log(start, end)
    return lambda t: inner(_clamp(2.0 * t, -math.inf, 1.0))


def _linear(start, end):
    return lambda t: start + (end - start) * t


_KINDS = {"poly": _poly, "log": _log, "log_half": _log_half, "linear": _linear}


def make_schedule(value: Value) -> Callable[[float], float]:
    """Turn a config value into v(progress). Raises ValueError on a malformed schedule."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        return lambda t: v
    if isinstance(value, Mapping):
        spec = dict(value)
        kind = spec.pop("schedule", None)
        if kind not in _KINDS:
            raise ValueError(f"unknown schedule {kind!r}; use one of {sorted(_KINDS)}")
        until, after = spec.pop("until", 1.0), spec.pop("after", 0.0)
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0.0 < float(until) <= 1.0:
            raise ValueError(f"schedule {kind!r}: `until` must be a fraction of training in (0, 1], got {until!r}")
        if isinstance(after, bool) or not isinstance(after, (int, float)) or not 0.0 <= float(after) < float(until):
            raise ValueError(f"schedule {kind!r}: `after` must be a fraction of training in [0, until), got {after!r}")
        try:
            fn = _KINDS[kind](**{k: float(v) for k, v in spec.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad arguments for schedule {kind!r}: {sorted(spec)}") from e
        until, after = float(until), float(after)
        return lambda t: fn(_clamp((t - after) / (until - after), 0.0, 1.0))
    raise ValueError(f"expected a number or a schedule mapping, got {value!r}")


def final_value(value: Value) -> float:
    return make_schedule(value)(1.0)
