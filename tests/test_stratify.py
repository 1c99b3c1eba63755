"""study.stratify: one searched number on a shifted van der Corput grid (study.search.optimize.stratify), through
the real searcher: every first 2^k trials put one value in each of 2^k equal strata of the key's range."""
from __future__ import annotations

import math

import pytest
from conftest import QUICKSTART

from study.errors import ConfigError
from study.keys import NUMBER_KEY
from study.search.optimize.optuna_search import load_optuna_study
from study.search.optimize.searcher import StudySearch
from study.search.optimize.space import load_space
from study.search.optimize.stratify import shift_of, stratified_value, van_der_corput


def test_van_der_corput_reference_values():
    # written out by hand: 0, 1/2, 1/4, 3/4, 1/8, 5/8, 3/8, 7/8
    assert [van_der_corput(i) for i in range(8)] == [0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]


@pytest.mark.parametrize("log", [True, False])
def test_values_cover_equal_strata_of_the_range(log):
    space = load_space(QUICKSTART)
    param = next(p for p in space.params if p.key == "prune.keep_fraction")
    if not log:
        param = type(param)(**{**param.__dict__, "log": False})
    lo, hi = param.low, param.high
    for n in (4, 8, 16):
        values = [stratified_value(param, i, shift_of(7)) for i in range(n)]
        assert all(lo <= v <= hi for v in values)
        pos = [(math.log(v / lo) / math.log(hi / lo)) if log else (v - lo) / (hi - lo) for v in values]
        strata = sorted(int(round(((u - shift_of(7)) % 1.0) * n, 6)) % n for u in pos)  # unshifted, rounded
        assert strata == list(range(n))


def test_the_searcher_fixes_the_stratified_key_and_the_sampler_draws_the_rest(tmp_path):
    space = load_space(QUICKSTART, {"study.n_trials": 8, "study.sampler": "tpe", "study.sampler_options": None,
                                    "study.stratify": "prune.keep_fraction", "study.seed": 3})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    load_optuna_study(url, space.study.name, space)
    searcher = StudySearch(space, url)
    param = next(p for p in space.params if p.key == "prune.keep_fraction")
    configs = [searcher.suggest(f"t{i}") for i in range(8)]
    assert [c[NUMBER_KEY] for c in configs] == list(range(8))
    assert [c["prune.keep_fraction"] for c in configs] == pytest.approx(
        [stratified_value(param, i, shift_of(3)) for i in range(8)])
    assert len({c["prune.score_init"] for c in configs}) > 1  # the others are the sampler's


def test_stratify_names_a_searched_unconditional_number():
    with pytest.raises(ConfigError, match="study.stratify"):
        load_space(QUICKSTART, {"study.stratify": "prune.score_init"})
    with pytest.raises(ConfigError, match="study.stratify"):
        load_space(QUICKSTART, {"study.stratify": "attack.warmup_fraction"})
    with pytest.raises(ConfigError, match="study.stratify"):
        load_space(QUICKSTART, {"study.stratify": "nope"})
