"""Zarr trajectory stores: :func:`save`, :func:`append`, :func:`open`, :func:`iter_chunks`.

A store is a directory::

    STORE/
      pydso.json            manifest: the commit point (replaced atomically)
      part-000000-<id>.zarr  one zarr store per save/append, chunked by episode
      part-000001-<id>.zarr
      .lock                 advisory lock held by the writer (fcntl.flock)

Crash safety: a part is written in full under a temporary name (``.tmp-<id>.zarr``), its files are fsync'ed,
it is renamed to its final name, and only then is the manifest replaced (write ``.pydso.json.<pid>.<id>.json.tmp``,
fsync, ``os.replace``, fsync the directory). Existing parts are never modified. A writer killed at any moment
therefore leaves either the old manifest (the old episodes) or the new one (old + all new episodes); its
leftover temporary or unreferenced directories are ignored by :func:`open` and removed by the next
:func:`append`. One writer at a time per store (enforced with ``fcntl.flock`` where available); any number of
readers.

Creation is atomic and exclusive: :func:`save` builds the whole store in a staging directory
``.STORE.tmp-<pid>-<id>`` beside it and renames it into place only if nothing is there (a non-empty directory is
never replaced unless ``overwrite=True``), so two processes appending to the same new store both keep their
episodes: the loser of the race appends to the winner's store under the lock. Staging directories left by a killed
process (its pid no longer running) are removed by the next :func:`save` / :func:`append` on that path; nothing
else is touched.

Integrity: the manifest lists every file of every part with its size and BLAKE2b hash. :func:`open` checks that
every file is present with its size (a ``stat``, no data read); :func:`validate` on a path (or
``open(path, verify=True)``) also checks the hashes. A missing, truncated or damaged chunk is reported with the
store, the variable and the chunk. Stores written before the checksums existed still open (with a warning that
damage cannot be detected there).
"""

import builtins
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .._checks import check_positive_int
from .._io import atomic_write, check_writable_dir, fsync_path, pid_is_running
from ._schema import SCHEMA_VERSION, DatasetError, validate

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["save", "append", "open", "iter_chunks", "MANIFEST", "STORE_FORMAT"]

MANIFEST = "pydso.json"
STORE_FORMAT = "pydso-trajectory-store"
_STORE_VERSION = 1
_CHUNK_BYTES = 4 * 2**20
_PART_RE = re.compile(r"^part-\d{6}-[0-9a-f]{8}\.zarr$")
_TMP_PART_RE = re.compile(r"^\.tmp-[0-9a-f]{8}\.zarr$")
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")
_METADATA_FILES = frozenset(_ZARR_MARKERS)
_HASH_BLOCK = 2**20

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------- helpers
def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath), directory=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_write(path, "w", suffix=".json.tmp") as f:
        json.dump(obj, f, indent=1)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with builtins.open(root / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _episodes_per_chunk(ds: xr.Dataset, episodes_per_chunk: int | None) -> int:
    n = ds.sizes["episode"]
    if episodes_per_chunk is not None:
        return min(check_positive_int(episodes_per_chunk, "episodes_per_chunk", error=DatasetError), n)
    per_episode = sum(v.dtype.itemsize * math.prod(v.shape[1:]) for v in ds.data_vars.values())
    return int(min(n, max(1, _CHUNK_BYTES // max(per_episode, 1))))


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with builtins.open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _part_files(part: Path) -> dict[str, list]:
    """``{relative posix path: [size, blake2b hex digest]}`` of every file of a part."""
    out = {}
    for dirpath, _, filenames in os.walk(part):
        for name in filenames:
            path = Path(dirpath) / name
            out[path.relative_to(part).as_posix()] = [path.stat().st_size, _file_digest(path)]
    return dict(sorted(out.items()))


def _describe_file(rel: str) -> str:
    """ "variable 'state', chunk (1, 0, 0) (file 'state/c/1/0/0')" for a zarr file path inside a part."""
    pieces = rel.split("/")
    if len(pieces) == 1:
        return f"its group metadata file {rel!r}"
    variable, rest = pieces[0], pieces[1:]
    if rest and rest[0] == "c":
        rest = rest[1:]
    if rest and all(m in _METADATA_FILES for m in rest):
        return f"variable {variable!r}, its metadata file {rel!r}"
    return f"variable {variable!r}, chunk ({', '.join(rest)}) (file {rel!r})"


def _check_part_files(root: Path, entry: dict[str, Any], verify: bool) -> None:
    """Check the files of a part against the manifest: presence and size, and with ``verify`` the hashes."""
    files = entry.get("files")
    if not isinstance(files, dict):
        return
    part = root / entry["name"]
    for rel, record in files.items():
        path = part / rel
        where = f"corrupt store: part {entry['name']!r} of {str(root)!r} could not be opened: {_describe_file(rel)}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DatasetError(
                f"{where} is missing (deleted after it was written); its episodes cannot be read. Restore the file "
                "from a backup"
            ) from None
        if size != record[0]:
            raise DatasetError(
                f"{where} has {size} bytes, the manifest recorded {record[0]} (truncated or overwritten); restore "
                "the file from a backup"
            )
        if verify and _file_digest(path) != record[1]:
            raise DatasetError(
                f"{where} does not match its recorded checksum (its bytes changed after it was written); restore "
                "the file from a backup"
            )


def _write_part(ds: xr.Dataset, directory: Path, episodes_per_chunk: int | None) -> tuple[str, int, dict[str, list]]:
    """Write ``ds`` as a complete part into ``directory`` (atomically named); return (name, n_episodes, files)."""
    k = _episodes_per_chunk(ds, episodes_per_chunk)
    ds = ds.copy(deep=False)
    encoding = {}
    for name, var in ds.variables.items():
        var.encoding = {}
        if "episode" in var.dims:
            encoding[name] = {"chunks": tuple(k if d == "episode" else s for d, s in zip(var.dims, var.shape))}
    if any(var.chunks is not None for var in ds.variables.values()):
        ds = ds.chunk({"episode": k})
    n_parts = sum(1 for p in directory.iterdir() if _PART_RE.match(p.name))
    tag = uuid.uuid4().hex[:8]
    name = f"part-{n_parts:06d}-{tag}.zarr"
    tmp = directory / f".tmp-{tag}.zarr"
    try:
        ds.to_zarr(tmp, mode="w-", consolidated=False, encoding=encoding)
    except Exception as e:  # noqa: BLE001 - a failed write (disk full, unwritable data): a pydso error
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"could not write the episodes to {str(directory)!r}: {type(e).__name__}: {e}") from None
    _fsync_tree(tmp)
    files = _part_files(tmp)
    os.rename(tmp, directory / name)
    fsync_path(directory, directory=True)
    return name, int(ds.sizes["episode"]), files


def _part_entry(name: str, n: int, ds: xr.Dataset, files: dict[str, list]) -> dict[str, Any]:
    return {
        "name": name,
        "n_episodes": n,
        "parameters": ds.attrs.get("parameters", "null"),
        "variables": sorted(str(k) for k in ds.variables),
        "files": files,
    }


def _zarr_like(path: Path) -> bool:
    return any((path / m).exists() for m in _ZARR_MARKERS)


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise DatasetError(f"no trajectory store at {str(root)!r}: the path does not exist")
    if not root.is_dir():
        raise DatasetError(f"{str(root)!r} is a file, not a pydso trajectory store (a directory)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"cannot read the store {str(root)!r}: permission denied (the directory is not readable)")
    path = root / MANIFEST
    if not path.exists():
        if _zarr_like(root):
            raise DatasetError(
                f"{str(root)!r} is a zarr store not written by pydso (no {MANIFEST} manifest and no "
                "'pydso_schema_version' attribute); open it with xarray.open_zarr, make it follow the schema "
                "(pydso.data.make_dataset) and pydso.data.save it"
            )
        raise DatasetError(f"{str(root)!r} is not a zarr store (no {MANIFEST} manifest, no zarr metadata)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"cannot read the manifest of the store {str(root)!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"corrupt store {str(root)!r}: manifest {MANIFEST} is not valid JSON ({e})") from None
    ok = (
        isinstance(manifest, dict)
        and manifest.get("format") == STORE_FORMAT
        and isinstance(manifest.get("parts"), list)
        and manifest["parts"]
        and all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("n_episodes"), int)
            for p in manifest["parts"]
        )
    )
    if not ok:
        raise DatasetError(f"corrupt store {str(root)!r}: manifest {MANIFEST} does not describe a pydso store")
    if manifest.get("store_version") != _STORE_VERSION:
        raise DatasetError(
            f"store {str(root)!r} has store_version {manifest.get('store_version')!r}; this pydso reads "
            f"version {_STORE_VERSION}"
        )
    return manifest


def _open_zarr(path: Path, chunks: Any, what: str) -> xr.Dataset:
    try:
        return xr.open_zarr(path, consolidated=False, chunks=chunks)
    except Exception as e:  # noqa: BLE001 - any zarr/xarray failure means an unreadable store
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DatasetError(f"corrupt store: {what} could not be opened ({type(e).__name__}: {msg:.200})") from None


def _dask_chunks(chunks: Any) -> Any:
    if chunks is None or (isinstance(chunks, str) and chunks == "auto"):
        return {}
    if isinstance(chunks, int) and not isinstance(chunks, bool):
        if chunks < 1:
            raise DatasetError(f"chunks must be a positive number of episodes, got {chunks!r}")
        return {}  # rechunked after the parts are joined
    if isinstance(chunks, Mapping):
        return dict(chunks)
    raise DatasetError(f'chunks must be "auto", an integer, a mapping or None, got {chunks!r}')


# ------------------------------------------------------------------------------------------- public API
def open(  # noqa: A001
    path: PathLike, *, chunks: int | Mapping[str, int] | str | None = "auto", verify: bool = False
) -> xr.Dataset:
    """Open a trajectory store lazily.

    **Arguments:**

    - `path`: the store directory (written by :func:`save` / :func:`append`). A plain zarr store (e.g. written
        by ``xarray.Dataset.to_zarr``) is accepted read-only if it carries the ``pydso_schema_version`` attribute.
    - `chunks`: ``"auto"`` (default): one dask chunk per stored chunk of episodes; an integer: that many episodes
        per dask chunk; a mapping: passed to xarray; ``None``: load into memory (numpy).
    - `verify`: also check every stored file against the BLAKE2b hash in the manifest (reads the whole store once;
        :func:`validate` on the path does this and checks the values too). Without it only the presence and the
        size of every file are checked (no data read).

    **Returns:**

    A dask-backed ``xarray.Dataset`` holding the committed episodes. Its structure is validated (dims, dtypes,
    time, attributes), not its values (that would read the data): call :func:`validate` for that.

    **Raises:**

    :class:`DatasetError` if the path does not exist, is not a pydso store, or is corrupt: a chunk file or a
    variable missing, truncated or (with ``verify``) changed is named with the store, the part, the variable and
    the chunk. Stores written by older pydso versions have no checksums; they open with a warning.
    """
    if not isinstance(path, str | os.PathLike):
        raise DatasetError(f"path must be a str or os.PathLike naming a store directory, got {type(path).__name__}")
    root = Path(path)
    xchunks = _dask_chunks(chunks)
    if root.is_dir() and not (root / MANIFEST).exists() and _zarr_like(root):
        plain = _open_zarr(root, xchunks, f"zarr store {str(root)!r}")
        if "pydso_schema_version" not in plain.attrs:
            _read_manifest(root)  # raises the "foreign zarr store" error
        parts = [plain]
        manifest = None
    else:
        manifest = _read_manifest(root)
        parts = _open_parts(root, manifest, xchunks, verify)
    if len(parts) == 1:
        ds = parts[0]
    else:
        ds = xr.concat(
            parts,
            dim="episode",
            data_vars="all",
            coords="minimal",
            compat="override",
            join="override",
            combine_attrs="override",
        )
        params = [p.get("parameters", "null") for p in manifest["parts"]]
        if len(set(params)) > 1:
            bounds = np.cumsum([0] + [p["n_episodes"] for p in manifest["parts"]])
            ds.attrs["parameters_by_part"] = json.dumps(
                [
                    {"episodes": [int(a), int(b)], "parameters": json.loads(p)}
                    for a, b, p in zip(bounds[:-1], bounds[1:], params, strict=True)
                ]
            )
    ds = validate(ds, check_values=False)
    if chunks is None:
        try:
            return ds.load()
        except Exception as e:  # noqa: BLE001 - an unreadable chunk: name the store and how to find the chunk
            raise DatasetError(
                f"damaged store {str(root)!r}: reading it failed ({type(e).__name__}: {str(e)[:200]}); run "
                f"pydso.data.validate({str(root)!r}) to find the damaged chunk"
            ) from None
    if isinstance(chunks, int) and not isinstance(chunks, bool):
        ds = ds.chunk({"episode": chunks})
    return ds


def _open_parts(root: Path, manifest: dict[str, Any], xchunks: Any, verify: bool = False) -> list[xr.Dataset]:
    parts = []
    unchecked = [e["name"] for e in manifest["parts"] if not isinstance(e.get("files"), dict)]
    if unchecked:
        warnings.warn(
            f"store {str(root)!r} was written by an older pydso without checksums (parts {unchecked}): a missing or "
            "damaged chunk there cannot be detected. Re-save it to add them: "
            "pydso.data.save(pydso.data.open(old), new)",
            UserWarning,
            stacklevel=3,
        )
    for entry in manifest["parts"]:
        part_path = root / entry["name"]
        if not part_path.is_dir():
            raise DatasetError(f"corrupt store {str(root)!r}: part {entry['name']!r} listed in {MANIFEST} is missing")
        _check_part_files(root, entry, verify)
        part = _open_zarr(part_path, xchunks, f"part {entry['name']!r} of {str(root)!r}")
        listed = entry.get("variables")
        if isinstance(listed, list):
            lost = sorted(set(listed) - {str(k) for k in part.variables})
            if lost:
                raise DatasetError(
                    f"damaged store {str(root)!r}: part {entry['name']!r} has lost variable(s) {lost} that the "
                    "manifest lists; restore them from a backup"
                )
        try:
            validate(part, check_values=False)
        except DatasetError as e:
            raise DatasetError(f"corrupt store {str(root)!r}: part {entry['name']!r}: {e}") from None
        if part.sizes["episode"] != entry["n_episodes"]:
            raise DatasetError(
                f"corrupt store {str(root)!r}: part {entry['name']!r} holds {part.sizes['episode']} episodes, "
                f"the manifest says {entry['n_episodes']}"
            )
        parts.append(part)
    return parts


def save(ds: xr.Dataset, path: PathLike, *, overwrite: bool = False, episodes_per_chunk: int | None = None) -> Path:
    """Validate ``ds`` and write it as a new trajectory store at ``path``, atomically.

    **Arguments:**

    - `ds`: a dataset following the schema (numpy- or dask-backed).
    - `path`: the store directory to create.
    - `overwrite`: replace an existing pydso store at ``path`` (anything else there is never deleted).
    - `episodes_per_chunk`: episodes per zarr chunk; default: chunks of about 4 MiB.

    **Returns:**

    The store path.

    The store is written to a staging directory ``.NAME.tmp-<pid>-<id>`` next to ``path`` and renamed into place
    only if nothing is there (``rename(2)`` refuses a non-empty directory), so ``path`` never holds a half-written
    store and an existing store is never replaced without ``overwrite=True`` — not even one that another process
    created during the write. With ``overwrite=True`` the old store is moved aside, the new one renamed in, and the
    old one deleted. Staging directories of killed processes are removed by the next write (module docstring).

    **Raises:**

    :class:`DatasetError` if ``ds`` is invalid or ``path`` exists (and ``overwrite`` is False, or it is not a
    pydso store), or if ``path`` cannot be written (a file in the way, no permission) — checked before writing.
    """
    root = _store_path(path, "save")
    _check_dataset(ds, "save")
    validate(ds)
    return _save(ds, root, overwrite=overwrite, episodes_per_chunk=episodes_per_chunk)


class _StoreExists(DatasetError):
    """Raised by :func:`_save` when another writer created the store first (append then appends to it)."""


def _store_path(path: Any, what: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise DatasetError(
            f"{what}: path must be a str or os.PathLike naming a store directory, got {type(path).__name__}"
        )
    check_writable_dir(path, f"{what}: path", error=DatasetError)
    return Path(path)


def _check_dataset(ds: Any, what: str) -> None:
    if not isinstance(ds, xr.Dataset):
        raise DatasetError(
            f"{what}: ds must be an xarray.Dataset of the pydso schema, got {type(ds).__name__}; build one with "
            "pydso.data.make_dataset(state, ...) or pydso.data.to_dataset(trajectories, problem, theta)"
        )


# .NAME.tmp-<pid>-<id> (save's staging), .NAME.old-<pid>-<id> (a replaced store being deleted),
# .NAME.recording-<pid>-<id> (pydso.rollout(record=...)'s staging store) and the staging of that staging store.
_STAGING_RE = r"^\.(\.)?{name}\.(tmp|old|recording)-(\d+)-([0-9a-f]{{8}}|[0-9a-f]{{12}})(\.tmp-\d+-[0-9a-f]{{8}})?$"


def _remove_stale_staging(root: Path) -> None:
    """Remove the staging (``.NAME.tmp-<pid>-<id>``), set-aside (``.NAME.old-<pid>-<id>``) and recording
    (``.NAME.recording-<pid>-<id>``, from ``pydso.rollout(record=...)``) directories of ``root`` left by a pydso
    process that is no longer running. Only directories with these exact names and only pydso's own files inside
    are removed; anything else (a user's look-alike, a live process's staging) is left alone."""
    pattern = re.compile(_STAGING_RE.format(name=re.escape(root.name)))
    parent = root.parent
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or pid_is_running(int(m.group(3))):
            continue
        if (m.group(1) is None) != (m.group(5) is None):  # '..NAME.recording-...' must end in '.tmp-...'
            continue
        if m.group(2) != "old" or m.group(5):
            inner = {p.name for p in entry.iterdir()}
            own = all(
                n in (MANIFEST, ".lock") or _PART_RE.match(n) or n.startswith(".tmp-") or n.startswith(f".{MANIFEST}.")
                for n in inner
            )
        else:  # a replaced store that was being deleted: it has a manifest
            own = (entry / MANIFEST).exists()
        if own:
            shutil.rmtree(entry, ignore_errors=True)


def _save(ds: xr.Dataset, root: Path, *, overwrite: bool, episodes_per_chunk: int | None) -> Path:
    if root.exists():
        if not overwrite:
            raise DatasetError(f"a store already exists at {str(root)!r}; pass overwrite=True to replace it")
        if not (root.is_dir() and ((root / MANIFEST).exists() or not any(root.iterdir()))):
            raise DatasetError(
                f"refusing to overwrite {str(root)!r}: it is not a pydso trajectory store (no {MANIFEST})"
            )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create the directory of the store {str(root)!r}: {e.strerror}") from None
    _remove_stale_staging(root)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        name, n, files = _write_part(ds, tmp, episodes_per_chunk)
        manifest = {
            "format": STORE_FORMAT,
            "store_version": _STORE_VERSION,
            "pydso_schema_version": SCHEMA_VERSION,
            "n_episodes": n,
            "parts": [_part_entry(name, n, ds, files)],
        }
        _write_json_atomic(tmp / MANIFEST, manifest)
        if overwrite and root.exists():
            old = root.parent / f".{root.name}.old-{tag}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_exclusive(tmp, root)
        fsync_path(root.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _rename_exclusive(src: Path, dst: Path) -> None:
    """Rename the complete store ``src`` to ``dst`` unless a store or file is there (then raise
    :class:`_StoreExists`): ``rename(2)`` refuses a non-empty target directory and a file, so of two writers
    creating the same store exactly one wins and the other sees the winner's complete store. (Only an *empty*
    directory appearing at ``dst`` during the write would be replaced: it holds nothing to lose.)"""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _StoreExists(f"a store already exists at {str(dst)!r}; pass overwrite=True to replace it") from None
        raise


def _check_compatible(old: xr.Dataset, new: xr.Dataset, root: Path) -> None:
    where = f"cannot append to {str(root)!r}:"
    v_old, v_new = old.attrs.get("pydso_schema_version"), new.attrs.get("pydso_schema_version")
    if v_old != v_new:
        raise DatasetError(f"{where} the new data has pydso_schema_version {v_new!r}, the store {v_old!r}")
    for attr in ("system", "dt", "units"):
        a, b = old.attrs.get(attr), new.attrs.get(attr)
        if a != b:
            raise DatasetError(f"{where} attribute {attr!r} differs: store has {a!r}, new data has {b!r}")
    names_old, names_new = set(old.data_vars), set(new.data_vars)
    if names_old != names_new:
        raise DatasetError(
            f"{where} the variables differ: missing {sorted(names_old - names_new)}, "
            f"extra {sorted(names_new - names_old)}"
        )
    for name in sorted(names_old):
        a, b = old[name], new[name]
        if a.dims != b.dims:
            raise DatasetError(f"{where} variable {name!r} has dims {b.dims}, the store {a.dims}")
        for dim, sa, sb in zip(a.dims, a.shape, b.shape):
            if dim != "episode" and sa != sb:
                raise DatasetError(f"{where} variable {name!r}: dimension {dim!r} has size {sb}, the store {sa}")
        if a.dtype != b.dtype:
            raise DatasetError(f"{where} variable {name!r} has dtype {b.dtype}, the store {a.dtype}")
    coords_old = {k for k, c in old.coords.items() if "episode" not in c.dims}
    coords_new = {k for k, c in new.coords.items() if "episode" not in c.dims}
    if coords_old != coords_new:
        raise DatasetError(f"{where} the coordinates differ: store {sorted(coords_old)}, new {sorted(coords_new)}")
    for name in sorted(coords_old):
        if not old.coords[name].variable.equals(new.coords[name].variable):
            raise DatasetError(f"{where} coordinate {name!r} differs from the store's")
    episode_coord_old, episode_coord_new = "episode" in old.coords, "episode" in new.coords
    if episode_coord_old != episode_coord_new:
        raise DatasetError(f"{where} only one of the store and the new data has an 'episode' coordinate")


def _collect_garbage(root: Path, manifest: dict[str, Any]) -> None:
    keep = {p["name"] for p in manifest["parts"]}
    for entry in root.iterdir():
        stale = (
            _TMP_PART_RE.match(entry.name)
            or (entry.name.startswith(f".{MANIFEST}.") and entry.name.endswith(".json.tmp"))
            or (_PART_RE.match(entry.name) and entry.name not in keep)
        )
        if stale:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def append(path: PathLike, ds: xr.Dataset, *, episodes_per_chunk: int | None = None) -> int:
    """Append the episodes of ``ds`` to the store at ``path`` (created if it does not exist), crash-safely.

    **Arguments:**

    - `path`: the store directory.
    - `ds`: episodes to add; same schema version, ``system``, ``dt``, ``units``, variables, dims, feature sizes,
        dtypes and ``time`` coordinate as the store. The ``parameters`` may differ (e.g. data from several
        behaviour chains): :func:`open` then lists them per episode range in ``parameters_by_part``.
    - `episodes_per_chunk`: episodes per zarr chunk of the new part; default: chunks of about 4 MiB.

    **Returns:**

    The number of episodes in the store after the append.

    A process killed at any point (even with SIGKILL) leaves the store holding exactly the old episodes or the
    old and all the new ones; see the module docstring. Appends from several processes are serialised by a lock,
    including the first ones that create the store: every append that returns is in the store.

    **Raises:**

    :class:`DatasetError` if the store is unreadable or ``ds`` is invalid or incompatible with it.
    """
    root = _store_path(path, "append")
    _check_dataset(ds, "append")
    if not root.exists():
        validate(ds)
        try:
            _save(ds, root, overwrite=False, episodes_per_chunk=episodes_per_chunk)
            return int(ds.sizes["episode"])
        except _StoreExists:
            pass  # another writer created the store first: append to it under the lock
    if root.is_dir() and not (root / MANIFEST).exists() and _zarr_like(root):
        open(root)  # raises for a foreign store
        raise DatasetError(
            f"cannot append to {str(root)!r}: a plain zarr store, not a pydso store; "
            "pydso.data.save(pydso.data.open(path), new_path) converts it"
        )
    if not (root / MANIFEST).exists():
        _read_manifest(root)  # raises: not a pydso store (before a lock file is created in it)
    _remove_stale_staging(root)
    with _locked(root):
        old = open(root)
        manifest = _read_manifest(root)
        _check_compatible(old, ds, root)
        validate(ds)
        _collect_garbage(root, manifest)
        name, n, files = _write_part(ds, root, episodes_per_chunk)
        manifest = dict(manifest)
        manifest["parts"] = [*manifest["parts"], _part_entry(name, n, ds, files)]
        manifest["n_episodes"] = int(sum(p["n_episodes"] for p in manifest["parts"]))
        _write_json_atomic(root / MANIFEST, manifest)
    return manifest["n_episodes"]


def iter_chunks(ds: xr.Dataset, episodes_per_chunk: int | None = None) -> Iterator[xr.Dataset]:
    """Yield ``ds`` as in-memory (numpy-backed) datasets of consecutive episodes, one chunk at a time.

    **Arguments:**

    - `ds`: a dataset, typically lazily opened with :func:`open`.
    - `episodes_per_chunk`: episodes per yielded dataset; default: the dask chunks of ``ds`` along ``episode``
        (one stored chunk at a time), or all episodes if ``ds`` is in memory.

    **Yields:**

    ``xarray.Dataset`` objects of consecutive episodes, in order, at most ``episodes_per_chunk`` each — except
    that a single trailing episode joins the chunk before it, so that every chunk of a multi-episode dataset
    holds at least two episodes (leave-one-out baselines need them). Only one is read into memory at a time.
    """
    n = ds.sizes["episode"]
    if episodes_per_chunk is None:
        sizes = None
        for var in ds.data_vars.values():
            if var.chunks is not None:
                sizes = var.chunksizes["episode"]
                break
        bounds = np.cumsum([0, *sizes]) if sizes else np.array([0, n])
    else:
        check_positive_int(episodes_per_chunk, "episodes_per_chunk", error=DatasetError)
        bounds = np.append(np.arange(0, n, int(episodes_per_chunk)), n)
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds = np.delete(bounds, -2)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        sub = ds.isel(episode=slice(int(start), int(stop)))
        try:
            chunk = sub.compute()
        except Exception as e:  # noqa: BLE001 - a failed read of stored chunks: report which episodes
            raise DatasetError(f"could not read episodes {start}..{stop - 1}: {type(e).__name__}: {e}") from None
        yield chunk
