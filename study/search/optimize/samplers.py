"""The Optuna samplers a study may name (`study.sampler`): the one registry of sampler names.

Each entry returns the sampler class, importing Optuna only then (loading a search-space file stays
light). To add a sampler, register one more function here: validation, error messages, the options check
and the study all read this registry.
"""
from __future__ import annotations

import inspect
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


def make_sampler(settings: Any, seed_offset: int = 0) -> Any:
    """The sampler of a study's settings (study.search.optimize.space.StudySettings, or a SearchSpace's), seeded with
    study.seed + `seed_offset` (a resumed study: the trials it holds, so it does not propose its first points
    again)."""
    s = getattr(settings, "study", settings)
    return sampler_class(s.sampler)(seed=s.seed + seed_offset, **s.sampler_options)
