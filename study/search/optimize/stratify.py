"""`study.stratify`: one searched number (the model's size, typically `prune.keep_fraction`) drawn on a shifted
low-discrepancy grid over its range instead of by the sampler; the sampler chooses every other key.

A front of size against robustness needs points at every size; a model-based sampler drifts to the sizes it
found good first. Trial i takes the i-th point of the van der Corput sequence (base 2: 0, 1/2, 1/4, 3/4, ...),
shifted by a number drawn from the study's seed, mapped onto the key's range (in log space for a log key): any
first 2^k trials cover the range in 2^k equal strata, one trial each. The value reaches the sampler as a fixed
parameter (Optuna's `enqueue_trial`), so the sampler still models it with the other keys.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Sequence

AUTO = "prune.keep_fraction"  # what `study.stratify: auto` (the default) draws on its grid where it is searched


def resolve_stratify(settings: Any, params: Sequence[Any]) -> Any:
    """The StudySettings with `stratify` resolved ("auto": AUTO where it is a searched number without a `when`,
    else off) and checked: a named key must be a searched float/int without a `when` condition."""
    from study.errors import ConfigError

    numbers = [q.key for q in params if q.kind in ("float", "int") and not q.when]
    if settings.stratify == "auto":
        settings = dataclasses.replace(settings, stratify=AUTO if AUTO in numbers else "")
    if settings.stratify and settings.stratify not in numbers:
        raise ConfigError("study.stratify", f"{settings.stratify!r} is not a searched number without a `when` "
                          f"condition; one of: {', '.join(numbers) or '(none)'}")
    return settings


def van_der_corput(i: int) -> float:
    """The i-th point (i >= 0) of the base-2 van der Corput sequence in [0, 1)."""
    u, f, n = 0.0, 0.5, i
    while n:
        u += f * (n & 1)
        n >>= 1
        f /= 2
    return u


def shift_of(seed: int) -> float:
    return random.Random(f"stratify-{seed}").random()


def stratified_value(param: Any, i: int, shift: float) -> float:
    """Trial i's value of a float/int `param` (study.search.optimize.space.Param: low, high, log)."""
    u = (van_der_corput(i) + shift) % 1.0
    lo, hi = float(param.low), float(param.high)
    value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if param.log else lo + u * (hi - lo)
    if param.kind == "int":
        return int(min(hi, max(lo, round(value))))
    return min(hi, max(lo, value))
