"""File-system helpers shared by the package: one atomic file write and one ``module:factory`` loader.

Atomic writes follow the usual recipe (write a temporary file in the target's directory, flush and ``fsync`` it,
``os.replace`` it over the target, ``fsync`` the directory): a reader sees the old file or the new one, never a
half-written one, and a crash leaves at worst a stray temporary file that pydso created.
"""

import contextlib
import importlib
import importlib.util
import os
import re
import secrets
import sys
from collections.abc import Iterator
from typing import IO

from ._errors import ProblemError

__all__ = [
    "fsync_path",
    "atomic_write",
    "load_object",
    "pid_is_running",
    "remove_stale_temporaries",
    "check_writable_file",
    "check_writable_dir",
]


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


def pid_is_running(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine (``os.kill(pid, 0)``; a process of another user
    counts as running). Used to decide whether a temporary file named after its creator's pid is stale."""
    if pid <= 0:
        return True  # never treat a malformed pid as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _temporary_pattern(base: str, suffix: str) -> "re.Pattern[str]":
    return re.compile(rf"^\.{re.escape(base)}\.pid(\d+)\.[A-Za-z0-9_]{{8}}{re.escape(suffix)}$")


def remove_stale_temporaries(path: "str | os.PathLike", *, suffix: str = ".tmp") -> list[str]:
    """Remove the temporary files that :func:`atomic_write` created for ``path`` (``.NAME.pid<PID>.XXXXXXXX<suffix>``
    beside it) in processes that are no longer running, e.g. a run killed mid-write. Nothing else is touched: only
    regular files with exactly that name pattern, for this target and suffix, whose creating pid is gone.

    **Returns:** the paths removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    pattern = _temporary_pattern(os.path.basename(path), suffix)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None or pid_is_running(int(m.group(1))):
            continue
        full = os.path.join(directory, name)
        if os.path.isfile(full) and not os.path.islink(full):
            with contextlib.suppress(OSError):
                os.remove(full)
                removed.append(full)
    return removed


def check_writable_file(path: "str | os.PathLike", what: str, *, error: type[Exception] = ProblemError) -> str:
    """Check, before any work is done, that the file ``path`` can be written: its directory exists or can be
    created (no file in the way), is writable, and ``path`` itself is not a directory. Raises ``error`` naming
    ``what`` (e.g. ``"checkpoint"``, ``"--out"``) and the reason. Returns ``os.fspath(path)``."""
    if not isinstance(path, str | os.PathLike):
        raise error(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise error(f"{what}: {path!r} is a directory; give a file path")
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise error(f"{what}: cannot write {path!r}: {probe!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{what}: cannot write {path!r}: no permission to write in the directory {probe!r}")
    if os.path.exists(path) and not os.access(path, os.W_OK) and not os.access(directory, os.W_OK):
        raise error(f"{what}: cannot write {path!r}: permission denied")
    return path


def check_writable_dir(path: "str | os.PathLike", what: str, *, error: type[Exception] = ProblemError) -> str:
    """Check, before any work is done, that the directory ``path`` (e.g. a trajectory store) can be created or
    written: no file is at ``path`` or in the way above it, and the directory that will hold it is writable.
    Raises ``error`` naming ``what`` (e.g. ``"record"``) and the reason. Returns ``os.fspath(path)``."""
    if not isinstance(path, str | os.PathLike):
        raise error(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise error(f"{what}: {path!r} is a file, not a directory (a store); choose another path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise error(f"{what}: cannot write in {path!r}: permission denied")
        return path
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise error(f"{what}: cannot create {path!r}: {probe!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{what}: cannot create {path!r}: no permission to write in the directory {probe!r}")
    return path


@contextlib.contextmanager
def atomic_write(path: "str | os.PathLike", mode: str = "wb", *, suffix: str = ".tmp") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is synced and renamed over ``path``,
    on an exception it is removed and ``path`` is left untouched.

    The temporary file is named ``.NAME.pid<PID>.XXXXXXXX<suffix>`` after the writing process, so that one left by a
    killed process can be recognised: each call first removes such files of *dead* processes for the same target
    (:func:`remove_stale_temporaries`), never anything else.

    **Arguments:**

    - ``path``: the file to (re)place. Its directory is created if missing.
    - ``mode``: ``"wb"`` or ``"w"`` (text, UTF-8).
    - ``suffix``: suffix of the temporary name (e.g. ``".tmp.npz"``, so that libraries that add extensions don't).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path, suffix=suffix)
    base = os.path.basename(path)
    fd, tmp = _mkstemp(directory, f".{base}.pid{os.getpid()}.", suffix)
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


def _mkstemp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` with exactly 8 random name characters (the pattern of :func:`remove_stale_temporaries`)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
    for _ in range(100):
        name = prefix + "".join(secrets.choice(alphabet) for _ in range(8)) + suffix
        full = os.path.join(directory, name)
        try:
            return os.open(full, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), full
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory!r}")  # pragma: no cover


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
