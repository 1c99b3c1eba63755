"""Where a study lives on disk: runs/<name>/ and its manifest.

    runs/<name>/study.json          the manifest: space file, Optuna storage, tracking URI (relative to the folder), parent run id
    runs/<name>/.lock               the running driver (study.search.folder.lock)
    runs/<name>/space.yaml          the validated search space (what `study resume` reads)
    runs/<name>/optuna.db           the default Optuna storage
    runs/<name>/tune/<name>/        the Ray Tune experiment of the last run or resume (scratch: never read back)
    runs/<name>/pretrained/         the dense checkpoint, keyed by its config
    runs/<name>/trials/<number>/    checkpoint.pt (while it runs), result.json, model.pt, final.json, confirm.json,
                                    robustness_final.json
    runs/<name>/pareto.csv          the Pareto front

With --runs-dir on an object store (s3://BUCKET/PREFIX, study.search.folder.store) the same layout lives in the
bucket, and `root` is the driver's local mirror of it: `push` copies what the driver wrote to the bucket,
`pull` brings what it reads from there. Both do nothing for a local study.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from study.search.folder.store import Store, data_dir, is_remote, mirror_dir

TRIAL_CHECKPOINT_FILE = "checkpoint.pt"  # a running trial's last resume state (torch, weights-only)
TRIAL_FINAL_FILE = "final.json"  # a finished trial's last report (reported again, not retrained, on resume)
CONFIRM_FILE = "confirm.json"  # a front trial's test-split confirmation (study.confirm)
SUITE_FINAL_FILE = "robustness_final.json"  # a front trial's robustness suite on test (study.robustness)
STORAGE_SNAPSHOT = "optuna.db"  # in a bucket: a copy of an object-store study's local sqlite Optuna storage


def sqlite_file(url: str) -> Path:
    """The file of a sqlite:/// URL (a path that never exists for other URLs)."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else Path("/nonexistent/not-sqlite")


@dataclass(frozen=True)
class StudyPaths:
    root: Path  # runs/<name>, absolute (for an object-store study: its local mirror)
    name: str
    store: Store | None = None  # the study folder in an object store (its truth), None for a local study
    runs: str = ""  # the runs folder as the user gave it, for an object-store study

    @property
    def remote(self) -> bool:
        return self.store is not None

    @property
    def tune_storage(self) -> str:
        """Tune's storage_path: the tune folder, or its object-store URI."""
        return self.store.url("tune") if self.store is not None else str(self.tune_dir)

    @property
    def experiment_location(self) -> str:
        """The Tune experiment (for `tune ls`): a path or a URI."""
        return self.store.url(f"tune/{self.name}") if self.store is not None else str(self.experiment)

    def experiment_exists(self) -> bool:
        return self.store.exists(f"tune/{self.name}") if self.store is not None else self.experiment.exists()

    def remove_experiment(self) -> None:
        import shutil

        if self.store is not None:
            self.store.delete_tree(f"tune/{self.name}")
        shutil.rmtree(self.experiment, ignore_errors=True)

    def location(self, rel: str = "") -> str:
        """Where a file of the study really lives, for messages: the bucket's URI or the local path."""
        return self.store.url(rel) if self.store is not None else str(self.root / rel if rel else self.root)

    def push(self, *rels: str) -> None:
        """Copy these files of the mirror to the bucket (those that exist locally)."""
        if self.store is None:
            return
        for rel in rels:
            if (self.root / rel).is_file():
                self.store.upload_file(self.root / rel, rel)

    def pull(self, *rels: str) -> None:
        """Bring these files of the bucket to the mirror (those that exist there)."""
        if self.store is None:
            return
        for rel in rels:
            if self.store.is_file(rel):
                self.store.download_file(rel, self.root / rel)

    def push_tree(self, rel: str, names: Iterable[str] | None = None) -> None:
        if self.store is not None:
            self.store.upload_tree(self.root / rel, rel, names)

    def pull_tree(self, rel: str, names: Iterable[str] | None = None, skip: Iterable[str] = ()) -> None:
        if self.store is not None:
            self.store.download_tree(rel, self.root / rel, names, skip)

    def studies_beside(self) -> list[str]:
        """The studies in this study's runs folder of the bucket (names with a study.json)."""
        runs = Store(self.runs)
        return [d for d in runs.list_dirs() if runs.is_file(f"{d}/study.json")]

    def snapshot_storage(self, url: str) -> None:
        """An object-store study whose Optuna storage is the driver's local sqlite file: a copy of it goes to
        the bucket (STORAGE_SNAPSHOT) when the driver stops, so `study report` works from any machine."""
        if self.store is not None and sqlite_file(url).is_file():
            self.store.upload_file(sqlite_file(url), STORAGE_SNAPSHOT)

    def check_storage_here(self, url: str) -> None:
        """Resuming writes to the Optuna storage: an object-store study's sqlite file must be on this machine
        (such a study resumes anywhere only with a database URL as its storage)."""
        from study.errors import UserError

        if self.store is not None and url.startswith("sqlite:///") and not sqlite_file(url).is_file():
            raise UserError(f"study {self.name!r} keeps its Optuna trials in {url}, a file on the machine that "
                            f"started it, not here: resume it there, or start studies that must resume anywhere "
                            f"with --storage postgresql://... (or mysql://...)")

    def readable_storage(self, url: str) -> str:
        """The Optuna storage to read the study from: its own, or, for an object-store study whose sqlite file
        is on another machine, the copy the driver left in the bucket (fetched into the mirror)."""
        if self.store is None or not url.startswith("sqlite:///") or sqlite_file(url).is_file() \
                or not self.store.is_file(STORAGE_SNAPSHOT):
            return url
        local = self.store.download_file(STORAGE_SNAPSHOT, self.root / STORAGE_SNAPSHOT)
        print(f"[study] reading the copy of the Optuna storage in {self.location(STORAGE_SNAPSHOT)} (its own, "
              f"{url}, is on another machine)", flush=True)
        return f"sqlite:///{local}"

    def trial_location(self, number: int) -> str:
        """Where a trial's folder really lives: its URI in the bucket, or its local path."""
        return self.location(f"trials/{number:04d}")

    def pull_trial(self, number: int) -> Path:
        """A trial's folder in the mirror, filled from the bucket (the local folder of a local study)."""
        folder = trial_dir(self.root, number)
        self.pull_tree(f"trials/{number:04d}")
        return folder

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
        """A sqlite file in the study folder; for an object-store study (no file locks there), on the
        driver's disk (study.search.folder.store.data_dir)."""
        if self.store is not None:
            folder = data_dir(self.runs) / self.name
            folder.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{folder / 'optuna.db'}"
        return f"sqlite:///{self.root / 'optuna.db'}"


def study_paths(runs_dir: str | Path, name: str) -> StudyPaths:
    if is_remote(runs_dir):
        uri = str(runs_dir).rstrip("/")
        return StudyPaths(mirror_dir(uri) / name, name, Store(uri).child(name), uri)
    return StudyPaths(Path(runs_dir).resolve() / name, name)


def trial_dir(study_dir: str | Path, number: int) -> Path:
    """A trial's files, keyed by its Optuna number (which survives a resume)."""
    return Path(study_dir) / "trials" / f"{number:04d}"


@dataclass
class Manifest:
    """The study's manifest. In memory every location is absolute; on disk (study.json) the default
    Optuna storage, the default MLflow store and the runs folder are written relative to the study
    folder ("optuna.db", "../mlflow.db", "..") and resolved against the folder the manifest is read
    from, so a copied or moved study folder never writes into the original. A URL the user gave
    (postgresql://, http://, a sqlite file outside the runs folder) is kept as given."""
    name: str
    space_file: str  # the file the study came from
    storage: str  # Optuna storage URL or journal file
    tracking_uri: str
    parent_run_id: str = ""
    runs_dir: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        root = path.parent.resolve()
        data = dataclasses.asdict(self)
        data["storage"] = _relative(self.storage, root)
        data["tracking_uri"] = _relative(self.tracking_uri, root)
        if self.runs_dir and Path(self.runs_dir).resolve() == root.parent:
            data["runs_dir"] = ".."
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """Read a manifest, resolving relative locations against its folder. A manifest of an earlier
        release (absolute paths) is migrated: a path under its old runs folder is moved to the same
        place under the folder it is read from. Raises UserError on a damaged file."""
        from study.errors import UserError

        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            names = {f.name for f in dataclasses.fields(cls)}
            missing = [k for k in ("name", "storage", "tracking_uri") if k not in data]
            unknown = sorted(set(data) - names)
            if missing or unknown:
                raise ValueError(f"missing {', '.join(missing)}" if missing else f"unknown keys {', '.join(unknown)}")
            if not all(isinstance(v, str) for v in data.values()):
                raise ValueError("every value must be a string")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{path}: not a readable study manifest ({e}); restore it from a backup, or start "
                            f"the study over with `study run ... --fresh`") from None
        root = path.parent.resolve()
        old_runs = old_text = data.get("runs_dir", "")
        old_runs = Path(old_runs) if old_runs and Path(old_runs).is_absolute() else None
        data["storage"] = _resolve(data["storage"], root, old_runs)
        data["tracking_uri"] = _resolve(data["tracking_uri"], root, old_runs)
        data["runs_dir"] = old_text if is_remote(old_text) else str(root.parent)  # a bucket stays a bucket
        data.setdefault("space_file", "")
        return cls(**data)


_SQLITE = "sqlite:///"


def _relative(url: str, root: Path) -> str:
    """A sqlite or journal file under the runs folder (root.parent) as a path relative to the study folder."""
    if url.startswith(_SQLITE):
        path, scheme = url[len(_SQLITE):], _SQLITE
    elif url.startswith("journal:"):
        path, scheme = url[len("journal:"):], "journal:"
        path = "/" + path.lstrip("/") if path.startswith("//") else path
    elif "://" not in url and url.endswith((".log", ".journal")):
        path, scheme = url, ""
    else:
        return url
    p = Path(path)
    if not p.is_absolute():
        return url
    try:
        p.resolve().relative_to(root.parent)
    except ValueError:
        return url  # outside the runs folder: the user's own file, kept as given
    rel = os.path.relpath(p.resolve(), root)
    if scheme == _SQLITE and not rel.endswith(".db"):
        return url
    if scheme == "journal:" and not rel.endswith((".log", ".journal")):
        return url
    return rel


def _resolve(value: str, root: Path, old_runs: Path | None) -> str:
    """The absolute URL of a manifest entry (see Manifest)."""
    if value and "://" not in value and not value.startswith("journal:") and not Path(value).is_absolute():
        path = (root / value).resolve()
        return str(path) if value.endswith((".log", ".journal")) else f"{_SQLITE}{path}"
    if old_runs is None or old_runs == root.parent:
        return value
    for scheme in (_SQLITE, "journal:", ""):  # an earlier release's absolute path under its old runs folder
        if scheme and not value.startswith(scheme):
            continue
        rest = value[len(scheme):]
        if scheme == "journal:" and rest.startswith("//"):
            rest = "/" + rest.lstrip("/")
        p = Path(rest)
        if not p.is_absolute():
            continue
        try:
            tail = p.relative_to(old_runs)
        except ValueError:
            return value
        moved = root.parent / tail
        return f"{scheme}{moved}" if scheme != "journal:" else f"journal:{moved}"
    return value
