"""File-system helpers shared by the package: one atomic file write and one ``module:factory`` loader.

Atomic writes follow the usual recipe (write a temporary file in the target's directory, flush and ``fsync`` it,
``os.replace`` it over the target, ``fsync`` the directory): a reader sees the old file or the new one, never a
half-written one, and a crash leaves at worst a stray temporary file that pydso created.
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO

from ._errors import ProblemError

__all__ = ["fsync_path", "atomic_write", "load_object"]


def fsync_path(path: "str | os.PathLike", directory: bool = False) -> None:
    """``fsync`` a file or a directory (best effort: a platform without directory fsync is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: "str | os.PathLike", mode: str = "wb", *, suffix: str = ".tmp") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is synced and renamed over ``path``,
    on an exception it is removed and ``path`` is left untouched.

    **Arguments:**

    - ``path``: the file to (re)place. Its directory is created if missing.
    - ``mode``: ``"wb"`` or ``"w"`` (text, UTF-8).
    - ``suffix``: suffix of the temporary name (e.g. ``".tmp.npz"``, so that libraries that add extensions don't).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(directory, directory=True)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_object(spec: str, *, what: str = "factory", error: type[Exception] = ProblemError) -> object:
    """The object named by ``spec``: ``"package.module:name"`` (imported; the current directory is searched
    too, as ``python -m`` does) or ``"path/to/file.py:name"`` (executed from that file).

    Errors name ``what`` (e.g. ``"--model"``) and say which form was expected.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise error(f"{what} must be 'package.module:name' or 'path/to/file.py:name', got {spec!r}")
    module_name, attr = spec.rsplit(":", 1)
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise error(f"{what}: no such file {module_name!r}")
        loader_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if loader_spec is None or loader_spec.loader is None:
            raise error(f"{what}: cannot import {module_name!r} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's module failed: say so, with its error
            raise error(f"{what}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise error(f"{what}: cannot import module {module_name!r}: {e}") from e
    if not hasattr(module, attr):
        raise error(f"{what}: {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
