"""Old module paths, kept importable: a study written by the previous layout still resumes.

Ray Tune pickles its searcher, callbacks and trainable arguments by module path (study.runner.StudySearch,
study.space.SearchSpace, study.tracking.MlflowTrialCallback, ...). `install()` (run by study/__init__.py)
puts a finder on sys.meta_path that answers an old name with a stand-in module whose attributes are looked
up in the modules that now hold them, first by the renames below, then by name. New code never imports an
old path; remove an entry once no study of that layout needs to resume.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

# old module -> the modules its names live in now, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    **{f"study.{m}": (f"study.trial.{m}",) for m in
       ("config", "data", "models", "pruning", "attacks", "losses", "engine", "pipeline", "evaluation")},
    "study.space": ("study.search.space",),
    "study.tracking": ("study.search.tracking",),
    "study.trainable": ("study.search.trainable", "study.search.layout", "study.keys"),
    "study.runner": ("study.search.runner", "study.search.optuna_search", "study.search.layout",
                     "study.search.ray_cluster", "study.search.samplers", "study.search.console"),
    "study.robust_eval": ("study.search.robust_eval", "study.search.robust_settings", "study.search.front_files"),
    "study.robustness.cli": ("study.robustness.command",),
}
# old module -> {old name: "new.module:new_name"} for names that changed
RENAMED: dict[str, dict[str, str]] = {
    "study.runner": {"_define_by_run": "study.search.optuna_search:define_by_run",
                     "_trial_config": "study.search.trainable:build_config"},
}


class _OldModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = RENAMED.get(self.__name__, {}).get(name)
        if target is not None:
            module, _, attr = target.partition(":")
            return getattr(importlib.import_module(module), attr)
        for module in MOVED[self.__name__]:
            mod = importlib.import_module(module)
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(f"{self.__name__}.{name} (an old module path) no longer exists in {MOVED[self.__name__]}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _OldModule(spec.name, f"old path of {', '.join(MOVED[spec.name])}")
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
