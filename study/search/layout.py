"""Where a study lives on disk: runs/<name>/ and its manifest.

    runs/<name>/study.json          the manifest: space file, Optuna storage URL, tracking URI, parent run id
    runs/<name>/space.yaml          the validated search space (what `study resume` reads)
    runs/<name>/optuna.db           the default Optuna storage
    runs/<name>/tune/<name>/        the Ray Tune experiment (per-epoch checkpoints, for resume)
    runs/<name>/pretrained/         the dense checkpoint, keyed by its config
    runs/<name>/trials/<number>/    result.json, model.pt, final.json, confirm.json, robustness_final.json
    runs/<name>/pareto.csv          the Pareto front
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

TRIAL_FINAL_FILE = "final.json"  # a finished trial's last report (reported again, not retrained, on resume)
CONFIRM_FILE = "confirm.json"  # a front trial's test-split confirmation (study.confirm)
SUITE_FINAL_FILE = "robustness_final.json"  # a front trial's robustness suite on test (study.robustness)


@dataclass(frozen=True)
class StudyPaths:
    root: Path  # runs/<name>, absolute
    name: str

    @property
    def manifest(self) -> Path:
        return self.root / "study.json"

    @property
    def space(self) -> Path:
        return self.root / "space.yaml"

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    @property
    def experiment(self) -> Path:
        return self.tune_dir / self.name

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def pareto(self) -> Path:
        return self.root / "pareto.csv"

    @property
    def default_storage(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"


def study_paths(runs_dir: str | Path, name: str) -> StudyPaths:
    return StudyPaths(Path(runs_dir).resolve() / name, name)


def trial_dir(study_dir: str | Path, number: int) -> Path:
    """A trial's files, keyed by its Optuna number (which survives a resume)."""
    return Path(study_dir) / "trials" / f"{number:04d}"


@dataclass
class Manifest:
    name: str
    space_file: str  # the file the study came from
    storage: str  # Optuna storage URL or journal file
    tracking_uri: str
    parent_run_id: str = ""
    runs_dir: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        return cls(**json.loads(path.read_text()))
