"""`StudySearch`: the study's Ray Tune searcher, on Optuna's public ask/tell.

The Optuna storage is the study's only record of its trials; this searcher keeps nothing else that
matters (Tune's trial id -> Optuna number, for the trials of this driver) and is never restored: a resumed
study builds a new one, which reads the storage.

- `suggest`: an Optuna trial still RUNNING that no Tune trial of this driver has (the driver that asked it
  died) is handed out first, under its own number and with its own parameters, so the trainable continues
  it from `trials/<number>/`; then, while the study holds fewer than `n_trials` trials, a new one is asked
  (`study.ask()`); then FINISHED.
- `on_trial_complete`: tells Optuna by trial number. The trainable records its own errors (its last report
  carries `fail_reason`: FAIL with that reason); a trial Tune stopped before its final report (a scheduler,
  a stopper) is PRUNED; `error=True` comes only from a trial whose worker process died more often than
  `study.max_failures` allows (FAIL).

Tune pickles its searcher into the experiment folder; the pickle leaves the Optuna study and sampler out
(they are opened again on first use) and nothing ever reads it back.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from ray.tune.search import Searcher

from study.keys import FAIL_KEY, NODE_KEY, NUMBER_KEY
from study.search.optimize.space import SearchSpace

log = logging.getLogger("study.search")

STOPPED = "stopped by Tune before its final report (a scheduler or a stopper)"
DIED = ("it ended outside the trial's own code more often than study.max_failures allows (its worker process "
        "died: killed, out of memory?); see Tune's error file in the trial's Tune folder")


class StudySearch(Searcher):
    """Tune searcher over one Optuna study (see the module docstring)."""

    def __init__(self, space: SearchSpace, storage_url: str, n_trials: int | None = None,
                 stop_reasons: Mapping[str, str] | None = None):
        super().__init__(metric=None, mode=None)
        self.space, self.storage_url = space, storage_url
        self.name = space.study.name
        self.metrics = list(space.study.metrics)
        self.n_trials = space.study.n_trials if n_trials is None else n_trials
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number (this driver's trials)
        self.told: set[str] = set()
        self.stop_reasons = stop_reasons if stop_reasons is not None else {}  # Tune trial id -> why (a rung)
        self._study: Any = None
        self._storage: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Tune's pickle of it is scratch: no study, no sampler
        return {**self.__dict__, "_study": None, "_storage": None}

    # --- the Optuna study ----------------------------------------------------------------------------

    @property
    def study(self) -> Any:
        if self._study is None:
            import optuna

            from study.search.optimize.optuna_search import open_storage
            from study.search.optimize.samplers import make_sampler

            self._storage = storage = open_storage(self.storage_url)
            asked = len(optuna.load_study(study_name=self.name, storage=storage).get_trials(deepcopy=False))
            # a resumed study's sampler starts from another seed: the same seed would propose the same
            # first (random) points again
            self._study = optuna.load_study(study_name=self.name, storage=storage,
                                            sampler=make_sampler(self.space, seed_offset=asked))
        return self._study

    # --- Tune's calls --------------------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the space and the objectives are the study's own

    def suggest(self, trial_id: str) -> dict | str | None:
        from optuna.trial import TrialState

        study = self.study
        claimed = set(self.numbers.values())
        while True:
            orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.number not in claimed]
            if not orphans:
                break
            trial = min(orphans, key=lambda t: t.number)
            config = self._config_of(trial)
            if config is not None:
                log.warning("continuing Optuna trial %d (RUNNING when its driver stopped) from trials/%04d/",
                            trial.number, trial.number)
                self.numbers[trial_id] = trial.number
                return config
            claimed.add(trial.number)
        asked = len(study.get_trials(deepcopy=False))
        if asked >= self.n_trials:
            return Searcher.FINISHED
        if self.space.study.stratify:  # study.stratify: that key's value is fixed before the sampler draws the rest
            from study.search.optimize.stratify import shift_of, stratified_value

            param = next(p for p in self.space.params if p.key == self.space.study.stratify)
            study.enqueue_trial({param.key: stratified_value(param, asked, shift_of(self.space.study.seed))},
                                skip_if_exists=False)
        trial = study.ask()
        self.numbers[trial_id] = trial.number
        return {**self.space.suggest(trial), NUMBER_KEY: trial.number}

    def _config_of(self, trial: Any) -> dict | None:
        """The Tune config of an Optuna trial asked by an earlier driver, None when its parameters are not
        all there (the driver died between the ask and the last suggest): that trial is failed."""
        import optuna

        try:
            values = self.space.suggest(optuna.trial.FixedTrial(dict(trial.params), trial.number))
        except ValueError as e:
            self._tell(trial.number, None, f"asked but never started: its parameters are incomplete ({e})")
            return None
        return {**values, NUMBER_KEY: trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return  # multi-objective: Optuna takes no intermediate values

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.numbers.get(trial_id)
        if number is None or trial_id in self.told:
            if number is None:
                log.warning("Tune trial %s completed but has no Optuna trial; ignored", trial_id)
            return
        self.told.add(trial_id)
        result = result or {}
        attrs: dict[str, Any] = {"tune_trial_id": trial_id}
        if error:
            self._tell(number, None, DIED, attrs)
        elif not result.get("final"):
            self._tell(number, None, self.stop_reasons.get(trial_id, STOPPED), attrs, pruned=True)
        elif result.get(FAIL_KEY):
            self._tell(number, None, str(result[FAIL_KEY]), attrs)
        else:
            values = [result.get(m) for m in self.metrics]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                self._tell(number, None, f"objective not finite: {dict(zip(self.metrics, values))}", attrs)
                return
            from study.search.recording.tracking import numeric_metrics

            attrs.update({k: v for k, v in numeric_metrics(result).items() if k not in ("final", "step", "epoch")})
            if isinstance(result.get(NODE_KEY), str):
                attrs[NODE_KEY] = result[NODE_KEY]
            self._tell(number, [float(v) for v in values], None, attrs)

    def _tell(self, number: int, values: list[float] | None, reason: str | None,
              attrs: dict[str, Any] | None = None, pruned: bool = False) -> None:
        """Record Optuna trial `number`: COMPLETE with `values`, else FAIL (or PRUNED) with `reason`. A trial
        finished already (told by an earlier driver) is left as it is."""
        from optuna.trial import TrialState

        from study.search.optimize.optuna_search import set_user_attrs

        study = self.study
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if trial.state.is_finished():
            return
        attrs = dict(attrs or {})
        if reason is not None:
            attrs["stop_reason" if pruned else FAIL_KEY] = reason
            log.warning("Optuna trial %d recorded as %s: %s", number, "PRUNED" if pruned else "FAIL", reason)
        set_user_attrs(self._storage, self.name, number, attrs)
        state = TrialState.COMPLETE if values is not None else TrialState.PRUNED if pruned else TrialState.FAIL
        study.tell(number, values, state=state, skip_if_finished=True)

    # --- Tune's experiment snapshot --------------------------------------------------------------------

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        return  # the Optuna storage is the searcher's state: nothing to save beside Tune's snapshot

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        raise RuntimeError("a study resumes from its Optuna storage, never from a saved searcher")
