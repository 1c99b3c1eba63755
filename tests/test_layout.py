"""The package layout holds: no import cycles, no module too long without a reason, and every registry's
names in the error for an unknown value (one source for every choice list)."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
from conftest import ROOT

from study.errors import ConfigError

PACKAGES = ("study", "analysis")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, package: str, modules: dict[str, Path], top_level: bool) -> set[str]:
    """Project modules imported by `tree`: at module level only (`top_level`) or anywhere; imports under
    `if TYPE_CHECKING:` never run and do not count."""
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not (top_level and inner):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:  # `from pkg import sub` imports the submodule; `from mod import name`, the module
                    base = child.module or ""
                    if child.level:
                        base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
                for name in names:
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name:
                        found.add(name)
            visit(child, inner)

    visit(tree, False)
    return found


def _graph(top_level: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(path.read_text()), package, modules, top_level) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (one representative per back edge)."""
    cycles, state, stack = [], {}, []

    def dfs(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_the_known_edges():
    graph = _graph(top_level=True)
    assert "study.trial.config" in graph["study.trial.data"] or "study.errors" in graph["study.trial.config"]
    assert "study.search.optimize.space" in graph["study.search.study"]
    assert "study.trial.pipeline" not in graph["study.search.running.trainable"]  # imported inside a function only
    assert "study.trial.pipeline" in _graph(top_level=False)["study.search.running.trainable"]


@pytest.mark.parametrize("top_level", [True, False], ids=["module-level imports", "all imports"])
def test_no_import_cycles(top_level):
    """Module-level imports must form no cycle (an import order bug waiting to happen); neither may the
    imports inside functions (a lazy import is for cost, never to hide a cycle)."""
    assert _cycles(_graph(top_level)) == []


def test_no_module_over_400_lines_without_a_stated_reason():
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and f"over {MAX_LINES} lines because" not in doc:
            long.append(f"{name}: {len(text.splitlines())} lines")
    assert long == []


# ---------------------------------------------------------------------------------------------------
# One registry per choice list: the error for an unknown value names every registered name.


def _trial_error(key: str, value: str) -> ConfigError:
    from study.trial.config import trial_from_dict

    with pytest.raises(ConfigError) as e:
        trial_from_dict({}, {key: value})
    assert e.value.key == key
    return e.value


@pytest.mark.parametrize("key, registry", [
    ("prune.score_init", "study.trial.pruning:SCORE_INITS"),
    ("attack.schedule", "study.trial.attacks:EPS_SCHEDULES"),
    ("attack.loss", "study.trial.losses:LOSSES"),
    ("pretrain_attack.loss", "study.trial.losses:LOSSES"),
    ("model.arch", "study.trial.models:ARCHS"),
    ("data.name", "study.trial.data:DATASETS"),
])
def test_an_unknown_trial_choice_names_every_registered_name(key, registry):
    import importlib

    module, _, name = registry.partition(":")
    names = getattr(importlib.import_module(module), name).names()
    err = _trial_error(key, "magic")
    assert f"valid choices: {', '.join(names)}" in str(err)
    close = _trial_error(key, names[0] + "x")  # one letter off: the hint names it
    assert f"did you mean '{names[0]}'?" in str(close)


def test_an_unknown_sampler_names_every_registered_sampler():
    from study.search.optimize.samplers import SAMPLERS
    from study.search.optimize.space import parse_space

    data = {"study": {"name": "t", "sampler": "nsga"}, "trial": {}, "search": {"prune.keep_fraction": {"float": [0.1, 0.5]}}}
    with pytest.raises(ConfigError) as e:
        parse_space(copy.deepcopy(data), "x.yaml")
    assert e.value.key == "study.sampler"
    assert f"valid choices: {', '.join(SAMPLERS.names())}" in str(e.value) and "did you mean 'nsga2'?" in str(e.value)
    for name in SAMPLERS.names():  # every registered sampler loads and is accepted
        data["study"]["sampler"] = name
        assert parse_space(copy.deepcopy(data), "x.yaml").study.sampler == name


def test_an_unknown_threat_names_every_threat_of_the_enum():
    from study.robustness.command import parse_threats
    from study.robustness.threats import THREATS, Threat
    from study.search.front.robust_settings import parse_robustness

    assert THREATS == tuple(t.value for t in Threat)
    with pytest.raises(ConfigError) as e:
        parse_robustness({"threats": {"l1": [0.5]}})
    assert e.value.key == "study.robustness.threats.l1" and f"valid choices: {', '.join(THREATS)}" in str(e.value)
    from study.errors import UserError

    with pytest.raises(UserError, match=f"valid choices: {', '.join(THREATS)}"):
        parse_threats("linf,l3")
    with pytest.raises(ValueError, match=f"valid choices: {', '.join(THREATS)}"):
        Threat.parse("l3")
