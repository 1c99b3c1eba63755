"""Where a study's shared state lives: a folder, or an object store (`s3://bucket/prefix`, `gs://...`)
read and written through pyarrow.fs (the file-system layer Ray Tune itself uses for its storage_path).

On an object store the bucket is the study's truth; nothing of it may live only on one node's disk:
- trials, on whatever node they run, write their files (result.json, model.pt, then final.json last)
  straight to `<study>/trials/<n>/`, and the pretraining task writes the dense model once to
  `<study>/pretrained/<key>.pt` (one PUT: a reader sees the whole object or none), where every trial
  reads it into a node-local cache (`scratch_dir`);
- Tune's storage_path is `<study>/tune` (Tune uploads its experiment state and checkpoints itself);
- the driver keeps a local mirror of the study folder (`mirror_dir`) that it fills from the bucket
  before it reads and copies back to it after it writes (manifest, space.yaml, confirm.json,
  pareto.csv, the report), so deleting the mirror loses nothing.
Optuna stays on a database (an RDB URL, or the driver's local sqlite file: `data_dir`); MLflow on its
tracking URI, with the artifacts of a local store in the bucket (`<runs>/mlartifacts/<study>`), where a
trial's run references its model.pt in `<study>/trials/` instead of storing it again
(study.search.recording.tracking.model_by_reference).
Endpoints and credentials come from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY or AWS_PROFILE, an instance profile; for gs://, Google's default credentials).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from study.errors import UserError

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(location: str | os.PathLike | None) -> bool:
    """An object-store URI (s3://, gs://, gcs://), as opposed to a local path."""
    text = str(location or "")
    return "://" in text and text.split("://", 1)[0].lower() in REMOTE_SCHEMES


def _split(uri: str) -> tuple[str, str]:
    """(scheme, 'bucket/prefix') of an object-store URI, without a trailing slash."""
    scheme, rest = uri.split("://", 1)
    return scheme.lower(), rest.split("?", 1)[0].strip("/")


def _home_dir(env: str, default: Path, uri: str) -> Path:
    scheme, rest = _split(uri)
    return Path(os.environ.get(env) or default).expanduser() / scheme / rest


def mirror_dir(uri: str) -> Path:
    """The driver's local mirror of an object-store runs folder: a cache, safe to delete
    ($STUDY_CACHE_DIR, default ~/.cache/robust-prune-study)."""
    return _home_dir("STUDY_CACHE_DIR", Path("~/.cache/robust-prune-study"), uri)


def data_dir(uri: str) -> Path:
    """Where the driver keeps the local databases of an object-store study by default (Optuna's and
    MLflow's sqlite files): not a cache ($STUDY_DATA_DIR, default ~/.local/share/robust-prune-study)."""
    return _home_dir("STUDY_DATA_DIR", Path("~/.local/share/robust-prune-study"), uri)


def scratch_dir(uri: str) -> Path:
    """A node-local working folder for files of `uri` (a trial's outputs before upload, the dense-model
    cache): under the node's temporary folder, the same name on every node."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "robust-prune-study" / digest


class Store:
    """A folder of an object store (or of the local disk, for tests), addressed by relative paths."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self._fs = None
        self._base = ""

    def __getstate__(self) -> dict:  # sent to Ray workers: each node opens its own client
        return {"uri": self.uri}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"])

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def _open(self) -> tuple[object, str]:
        if self._fs is None:
            from pyarrow import fs as pafs

            self._fs, self._base = pafs.FileSystem.from_uri(self.uri)
            self._base = self._base.rstrip("/")
        return self._fs, self._base

    @property
    def fs(self):
        return self._open()[0]

    def path(self, rel: str = "") -> str:
        """The pyarrow path of `rel` (bucket/prefix/rel)."""
        base = self._open()[1]
        rel = str(rel).strip("/")
        return f"{base}/{rel}" if rel else base

    def url(self, rel: str = "") -> str:
        rel = str(rel).strip("/")
        return f"{self.uri}/{rel}" if rel else self.uri

    def child(self, rel: str) -> "Store":
        return Store(self.url(rel))

    # --- single objects ------------------------------------------------------------------------------

    def _type(self, rel: str):
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self.path(rel)).type, pafs.FileType

    def is_file(self, rel: str) -> bool:
        kind, types = self._type(rel)
        return kind == types.File

    def exists(self, rel: str = "") -> bool:
        """A file, or a folder holding at least one file (object stores have no empty folders)."""
        kind, types = self._type(rel)
        if kind == types.File:
            return True
        return kind == types.Directory and bool(self.list_files(rel))

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.is_file(rel):
                raise FileNotFoundError(self.url(rel)) from None
            raise OSError(f"{self.url(rel)}: {e}") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def sha256(self, rel: str) -> tuple[int, str]:
        """(size in bytes, sha256 hex digest) of one object, read in 1 MiB pieces."""
        digest, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(self.path(rel)) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT on an object store: a reader sees the old object or the whole new one."""
        fs, _ = self._open()
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        if not is_remote(self.uri):  # a local folder: write aside, then rename (atomic)
            tmp = f"{path}.tmp{os.getpid()}"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except (FileNotFoundError, OSError):
            if self.is_file(rel):
                raise

    def delete_tree(self, rel: str = "") -> None:
        """Every object under `rel` (nothing happens when there is none)."""
        from pyarrow import fs as pafs

        fs = self.fs
        for info in fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                fs.delete_file(info.path)
        try:
            fs.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    # --- trees ---------------------------------------------------------------------------------------

    def list_files(self, rel: str = "") -> dict[str, int]:
        """Relative path -> size of every file under `rel` ({} when there is none)."""
        from pyarrow import fs as pafs

        root = self.path(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly under `rel`."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def upload_file(self, local: str | os.PathLike, rel: str) -> None:
        self.write_bytes(rel, Path(local).read_bytes())

    def download_file(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy one object to a local file, atomically (a concurrent reader never sees half of it)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        data = self.read_bytes(rel)
        with tempfile.NamedTemporaryFile(dir=local.parent, prefix=f".{local.name}.", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, local)
        return local

    def upload_tree(self, local: str | os.PathLike, rel: str = "", names: Iterable[str] | None = None) -> int:
        """Upload the files under a local folder (only those whose file name is in `names`, when given)."""
        local, wanted, n = Path(local), set(names) if names is not None else None, 0
        if not local.is_dir():
            return 0
        for path in sorted(local.rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp") and (wanted is None or path.name in wanted):
                self.upload_file(path, f"{rel}/{path.relative_to(local).as_posix()}" if rel else
                                 path.relative_to(local).as_posix())
                n += 1
        return n

    def download_tree(self, rel: str, local: str | os.PathLike, names: Iterable[str] | None = None,
                      skip: Iterable[str] = ()) -> int:
        """Bring the files under `rel` to a local folder: those missing there or of another size (and, when
        `names` is given, only files with those names; never files named in `skip`). Returns the count."""
        local, wanted, skipped, n = Path(local), set(names) if names is not None else None, set(skip), 0
        for sub, size in self.list_files(rel).items():
            name = sub.rsplit("/", 1)[-1]
            if (wanted is not None and name not in wanted) or name in skipped:
                continue
            target = local / sub
            if target.is_file() and target.stat().st_size == size:
                continue
            self.download_file(f"{rel}/{sub}" if rel else sub, target)
            n += 1
        return n


# ---------------------------------------------------------------------------------------------------
# Checks before a study starts (one line each, exit status 2 through study.cli).


def check(uri: str, write: bool = True) -> None:
    """A usable object-store runs folder: a known scheme, a parseable URI, credentials, an existing bucket
    that this machine can read (and write, with `write`)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"--runs-dir {uri}: unknown storage scheme {scheme!r}; use a local folder, s3://BUCKET/PREFIX "
                        "or gs://BUCKET/PREFIX")
    rest = uri.split("://", 1)[1]
    bucket = rest.split("/", 1)[0].split("?", 1)[0]
    if not bucket:
        raise UserError(f"--runs-dir {uri}: no bucket in the URI (write it as {scheme}://BUCKET/PREFIX)")
    if scheme == "s3":
        _check_aws_credentials(uri)
    try:
        store = Store(uri)
        fs, _ = store._open()
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError with a readable message
        raise UserError(f"--runs-dir {uri}: not a usable object-store URI ({_first_line(e)})") from None
    from pyarrow import fs as pafs

    try:
        kind = fs.get_file_info(bucket).type
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--runs-dir {uri}: cannot reach the bucket {bucket!r} ({_first_line(e)})") from None
    if kind == pafs.FileType.NotFound:
        make = "aws s3 mb" if scheme == "s3" else "gcloud storage buckets create"
        raise UserError(f"--runs-dir {uri}: the bucket {bucket!r} does not exist (or these credentials cannot "
                        f"see it); create it ({make} {scheme}://{bucket}) or fix the URI")
    if write:
        probe = f".write-test-{os.getpid()}"
        try:
            store.write_bytes(probe, b"")
            store.delete(probe)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--runs-dir {uri}: cannot write to the bucket ({_first_line(e)}); the credentials need "
                            "s3:PutObject, s3:GetObject, s3:ListBucket and s3:DeleteObject on it") from None


def _check_aws_credentials(uri: str) -> None:
    """The AWS SDK's credential chain (environment, profile, instance role) must find credentials: without
    them a request is sent unsigned, which a real bucket refuses only later and less clearly."""
    try:
        import botocore.session
    except ImportError:  # the check needs botocore; pyarrow's own error comes later instead
        return
    import logging

    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." is noise
    try:
        creds = botocore.session.get_session().get_credentials()
    except Exception as e:  # noqa: BLE001 - a broken profile file, for example
        raise UserError(f"--runs-dir {uri}: the AWS credentials cannot be read ({_first_line(e)})") from None
    if creds is None or not creds.access_key:
        raise UserError(f"--runs-dir {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run on a node with an instance profile")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
