"""Tune's storage on a local disk, written atomically: no reader ever sees half a file.

Ray Tune saves a study's experiment snapshot (experiment_state-*.json, the searcher's pickle) in a staging
folder and then copies it into the storage folder with pyarrow, which truncates each destination file and
writes it anew. A driver killed during that copy (SIGKILL, a lost node, an out-of-memory kill: the moment
a trial completes is exactly when Tune snapshots) left a 0-byte searcher-state file behind; `study resume`
then failed to unpickle it, and Tune, on failing to restore its searcher, restarted the experiment and
waited forever.

`atomic_local_fs()` is pyarrow's LocalFileSystem except that every file it writes goes to a hidden
temporary file beside the destination and is renamed over it when complete (os.replace: atomic on POSIX).
A copy killed half-way leaves the previous version of each file (or none), never a truncated one.
Object stores need none of this: an object appears only when its upload completes.
"""
from __future__ import annotations

import os
import uuid
from typing import Any


class _AtomicFile:
    """A binary file object that becomes `path` when closed (and only then)."""

    def __init__(self, path: str):
        folder, name = os.path.split(path)
        self.path = path
        self.tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed (and renamed) by close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        os.replace(self.tmp, self.path)


def _handler_class() -> type:
    import pyarrow.fs as pafs

    class AtomicLocalHandler(pafs.FileSystemHandler):
        """pyarrow's local file system, with atomic whole-file writes (open_output_stream, copy_file)."""

        def __init__(self) -> None:
            self.fs = pafs.LocalFileSystem()

        def __reduce__(self):  # the Tune storage context travels to the trials' workers
            return (_new_handler, ())

        def __eq__(self, other: object) -> bool:
            return type(other).__name__ == "AtomicLocalHandler"

        def __hash__(self) -> int:
            return hash("AtomicLocalHandler")

        def get_type_name(self) -> str:
            return "atomic-local"

        def normalize_path(self, path: str) -> str:
            return self.fs.normalize_path(path)

        def get_file_info(self, paths: list[str]) -> list:
            return self.fs.get_file_info(paths)

        def get_file_info_selector(self, selector: Any) -> list:
            return self.fs.get_file_info(selector)

        def create_dir(self, path: str, recursive: bool) -> None:
            self.fs.create_dir(path, recursive=recursive)

        def delete_dir(self, path: str) -> None:
            self.fs.delete_dir(path)

        def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
            self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self) -> None:
            raise OSError("refusing to delete the contents of the root folder")

        def delete_file(self, path: str) -> None:
            self.fs.delete_file(path)

        def move(self, src: str, dest: str) -> None:
            self.fs.move(src, dest)

        def copy_file(self, src: str, dest: str) -> None:
            import shutil

            out = _AtomicFile(dest)
            try:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out._f, 1 << 20)
            except BaseException:
                out._f.close()
                os.unlink(out.tmp)
                raise
            out.close()

        def open_input_stream(self, path: str) -> Any:
            return self.fs.open_input_stream(path)

        def open_input_file(self, path: str) -> Any:
            return self.fs.open_input_file(path)

        def open_output_stream(self, path: str, metadata: Any) -> Any:
            import pyarrow as pa

            return pa.PythonFile(_AtomicFile(path), mode="w")

        def open_append_stream(self, path: str, metadata: Any) -> Any:
            return self.fs.open_append_stream(path)

    AtomicLocalHandler.__module__, AtomicLocalHandler.__qualname__ = __name__, "AtomicLocalHandler"
    return AtomicLocalHandler


_HANDLER: list[type] = []


def _new_handler() -> Any:
    if not _HANDLER:
        _HANDLER.append(_handler_class())
    return _HANDLER[0]()


def atomic_local_fs() -> Any:
    """A pyarrow FileSystem for a local Tune storage_path (RunConfig / Tuner.restore storage_filesystem)."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(_new_handler())
