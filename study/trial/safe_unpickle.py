"""Reading CIFAR-10's python batch files without running what a crafted file carries.

A CIFAR-10 batch is a pickled dict: bytes (or str) keys, the images as one numpy uint8 array, the labels as a
list of ints, the file names as a list of bytes. `pickle.load` would call any global a file names (a
`__reduce__` to `os.system`), so a folder of data files could run code. `load_batch` admits only the
globals these files use: numpy's array reconstruction (`_reconstruct`, `ndarray`, `dtype` as written by
Python 2's cPickle, the real files; `_frombuffer` as written by Python 3 with protocol 5, re-packed files)
and `_codecs.encode` with latin-1 (how Python 3 writes bytes in protocols 0-2). Anything else is refused,
in one line naming the file, before it is called.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {
    (module, name) for module in _NUMPY_MODULES for name in ("_reconstruct", "_frombuffer")}


class UnsafePickleError(ValueError):
    """A pickle names a global that a data file never needs."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin-1", errors)


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(f"it names {module}.{name}")


def load_batch(path: Path) -> dict[str, Any]:
    """One CIFAR-style batch file as a dict with str keys; ValueError with a one-line message (naming the
    file) for a file that names any other global, or that is not a readable pickle."""
    try:
        with open(path, "rb") as fh:
            entry = _DataUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError as e:
        raise ValueError(f"{path}: refused: not a CIFAR-10 batch file ({e}, which a data file never needs; "
                         "a crafted file?)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'damaged'})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch file (a {type(entry).__name__}, not a dict)")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
