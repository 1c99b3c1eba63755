"""The Optuna samplers a study may name (`study.sampler`): the one registry of sampler names.

Each entry returns the sampler class, importing Optuna only then (loading a search-space file stays
light). To add a sampler, register one more function here: validation, error messages, the options check
and the runner all read this registry.

Ray Tune pickles the searcher, sampler included, into every experiment snapshot. Optuna 5.1's genetic
samplers (NSGA-II, NSGA-III) hold a threading.Lock, which pickle refuses, so `make_sampler` returns the
sampler as `Picklable<Name>`: the same class, whose pickled state leaves its locks out and whose unpickling
makes new ones. Its class name is the original's, so the generation keys Optuna stores with each trial
(`NSGAIISampler:generation`) are the same with and without it.
"""
from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

from study.registry import Registry

SAMPLERS: Registry = Registry("sampler")


def _optuna_sampler(name: str, class_name: str) -> None:
    @SAMPLERS.register(name)
    def load() -> type:
        import optuna

        return getattr(optuna.samplers, class_name)


_optuna_sampler("tpe", "TPESampler")
_optuna_sampler("nsga2", "NSGAIISampler")
_optuna_sampler("gp", "GPSampler")
_optuna_sampler("random", "RandomSampler")


def sampler_class(name: str) -> type:
    return SAMPLERS.get(name)()


def option_names(name: str) -> list[str]:
    """The keyword arguments `study.sampler_options` may give the sampler (`seed` is study.seed)."""
    return [n for n in inspect.signature(sampler_class(name).__init__).parameters if n not in ("self", "seed")]


def make_sampler(settings: Any) -> Any:
    """The sampler of a study's settings (study.search.space.StudySettings, or a SearchSpace's), picklable."""
    s = getattr(settings, "study", settings)
    return picklable(sampler_class(s.sampler))(seed=s.seed, **s.sampler_options)


_LOCK_TYPES = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


class _LocksNotPickled:
    """Pickles an object without its lock attributes and gives it new ones when unpickled."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        locks = {k: type(v) for k, v in state.items() if type(v) in _LOCK_TYPES}
        for k in locks:
            del state[k]
        state["_unpickled_locks"] = {k: _LOCK_TYPES[t] is threading.RLock for k, t in locks.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        locks = state.pop("_unpickled_locks", {})
        self.__dict__.update(state)
        for k, reentrant in locks.items():
            setattr(self, k, threading.RLock() if reentrant else threading.Lock())


@functools.lru_cache(maxsize=None)
def picklable(cls: type) -> type:
    """`cls` with `_LocksNotPickled` mixed in, importable as study.search.samplers.Picklable<cls name>."""
    if not cls.__module__.startswith("optuna."):
        return cls  # a class of ours or a user's: its own business
    sub = type(cls.__name__, (_LocksNotPickled, cls), {"__module__": __name__})
    sub.__qualname__ = f"Picklable{cls.__name__}"
    return sub


def restored(sampler: Any) -> Any:
    """A sampler unpickled from an older snapshot, made current: picklable (`picklable`), and given the
    attributes the installed Optuna's class sets that its state lacks (Optuna 4's NSGA-II had no lock)."""
    cls = picklable(type(sampler))
    try:
        fresh = cls()
    except Exception:  # noqa: BLE001 - a sampler that needs arguments: left as it is
        return sampler
    fresh.__dict__.update(vars(sampler))  # its state, over the defaults of what it lacks
    return fresh


def __getattr__(name: str) -> Any:  # Picklable<Name>, found again by pickle in a new process
    if name.startswith("Picklable"):
        import optuna

        base = getattr(optuna.samplers, name[len("Picklable"):], None)
        if isinstance(base, type):
            return picklable(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
