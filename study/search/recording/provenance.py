"""What produced a study's MLflow runs and what they read, in MLflow's own terms.

Every run gets MLflow's standard system tags (shown in the UI's run page and the table's Source and User
columns): `mlflow.source.name` (the command: "study run", "study resume", ...), `mlflow.source.type`
(LOCAL), `mlflow.user`, and, where git knows them for the code that runs, `mlflow.source.git.commit`,
`mlflow.source.git.branch` and `mlflow.source.git.repoURL` (credentials in the URL are dropped); plus the
versions of python, torch, ray, optuna and mlflow. The study's data set is an MLflow dataset input of the
parent run and of each trial run (context "training"): its name, a short stable digest of what decides
which points a trial sees (the data set, where it is read from and the split settings), and that source.
Nothing here imports mlflow until a dataset input is built.
"""
from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.util
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
USER_TAG = "mlflow.user"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG = "mlflow.source.git.branch"
GIT_REPO_URL_TAG = "mlflow.source.git.repoURL"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag for what a run used a data set for
DATASET_CONTEXT = "training"
DIGEST_CHARS = 16  # MLflow stores at most 36
BUNDLED_DATASETS = {"digits": "scikit-learn"}  # data sets read from a Python package, not from data.root


def _git(*args: str) -> str:
    """One line of git's answer about the repository holding this code ("" when git or the repository is absent)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _without_credentials(url: str) -> str:
    """A remote's URL without a user name or token (https://user:token@host/... -> https://host/...)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))
    return url


@functools.lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """MLflow's git tags for the code that runs: the commit, the branch (not for a detached HEAD) and the
    origin's URL, each only where git knows it."""
    tags = {GIT_COMMIT_TAG: _git("rev-parse", "HEAD"), GIT_BRANCH_TAG: _git("rev-parse", "--abbrev-ref", "HEAD"),
            GIT_REPO_URL_TAG: _without_credentials(_git("config", "--get", "remote.origin.url"))}
    if tags[GIT_BRANCH_TAG] == "HEAD":
        tags[GIT_BRANCH_TAG] = ""
    return {k: v for k, v in tags.items() if v}


def source_name(argv: Sequence[str] | None = None) -> str:
    """The command that made the runs: "study <subcommand>" for the `study` command line, else the program."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]) if argv and argv[0] else Path("python")
    name = prog.parent.name if prog.name == "__main__.py" else prog.name  # `python -m pkg`: the package
    if name in ("study", "cli.py"):
        sub = next((a for a in argv[1:] if not a.startswith("-")), "")
        return f"study {sub}".strip()
    return name or "python"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a container without one)
        return "unknown"


def provenance_tags() -> dict[str, str]:
    """MLflow's source, user and git tags and the library versions: every run says what produced it."""
    tags = {SOURCE_NAME_TAG: source_name(), SOURCE_TYPE_TAG: "LOCAL", USER_TAG: _user(), **git_tags(),
            "python_version": platform.python_version()}
    for lib in ("torch", "ray", "optuna", "mlflow"):
        try:
            tags[f"{lib}_version"] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            tags[f"{lib}_version"] = "absent"
    return tags


# ---------------------------------------------------------------------------------------------------
# The data set as an MLflow dataset input.


def dataset_source(data: Any) -> tuple[str, str, str]:
    """(source type, source JSON, identity) of a trial's data set (`data`: a study.trial.config.DataConfig).
    A data set in a folder: "local" (or the URI's scheme) and the folder; one shipped in a Python package
    (digits): the package's data file where it is found. The identity is what the digest hashes: the folder,
    or the package (a machine's install path says nothing about the points)."""
    root = str(data.root)
    if data.name in BUNDLED_DATASETS:
        package = BUNDLED_DATASETS[data.name]
        spec = importlib.util.find_spec("sklearn") if package == "scikit-learn" else None  # found, not imported
        where = list(spec.submodule_search_locations or []) if spec is not None else []
        uri = (Path(where[0]) / "datasets" / "data" / f"{data.name}.csv.gz").as_uri() if where else f"{package}:{data.name}"
        return "local", json.dumps({"uri": uri, "package": package}), f"{package}:{data.name}"
    if "://" in root:
        return root.split("://", 1)[0].lower(), json.dumps({"uri": root}), root
    uri = Path(root).expanduser().resolve().as_uri()
    return "local", json.dumps({"uri": uri}), uri


def split_settings(data: Any) -> dict[str, Any]:
    """The settings that decide which points are train, validation and test (with the data set itself)."""
    return {"val_fraction": data.val_fraction, "train_limit": data.train_limit, "split_seed": data.split_seed}


def dataset_digest(data: Any) -> str:
    """A short, stable digest: sha256 of the name, the source's identity and the split settings."""
    _, _, identity = dataset_source(data)
    text = json.dumps({"name": data.name, "source": identity, **split_settings(data)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def dataset_input(data: Any) -> Any:
    """The MLflow DatasetInput of a DataConfig: name, digest, source, the split settings as its profile, and
    the context tag `mlflow.data.context` = training."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, source, _ = dataset_source(data)
    dataset = Dataset(name=data.name, digest=dataset_digest(data), source_type=source_type, source=source,
                      profile=json.dumps(split_settings(data)))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=DATASET_CONTEXT_TAG, value=DATASET_CONTEXT)])
