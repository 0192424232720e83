"""Readers for measured input/output records: CSV, NumPy ``.npz`` and MATLAB ``.mat`` files -> pydso datasets.

Every reader returns a one-episode pydso dataset (see :mod:`pydso.data`) with variables ``input``
``(1, time, input_dim)``, ``output`` ``(1, time, output_dim)`` and ``state``: measured records rarely contain
the state, so unless a ``"state"`` role is given the ``state`` variable is a copy of ``output`` (the schema
requires one; identification never treats it as the model state unless its size matches the model's).

``columns`` maps roles (``"input"``, ``"output"``, optionally ``"state"``) to a list of column names (or
0-based column indices for CSV; variable names for npz/mat — a 2-D array contributes all its columns). Errors
are :class:`ReaderError` (a ``ValueError``) and name the file, the column/variable and the problem.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:  # the schema module imports nothing from pydso: no cycle
    from ._schema import DatasetError as _BaseError
    from ._schema import make_dataset as _make_dataset
except ImportError:  # pragma: no cover - only while pydso.data is being written
    _BaseError = ValueError
    _make_dataset = None

__all__ = ["ReaderError", "from_csv", "from_npz", "from_mat"]

_ROLES = ("input", "output", "state")


class ReaderError(_BaseError):
    """A measured record cannot be read into a dataset; the message names the file, column and problem."""


def _build(arrays: dict, dt: float, units, system, path, attrs):
    if not (isinstance(dt, int | float) and np.isfinite(dt) and dt > 0):
        raise ReaderError(f"{path}: dt must be a positive sampling interval in seconds, got {dt!r}")
    state = arrays.get("state", arrays.get("output"))
    if state is None:
        raise ReaderError(f"{path}: columns must name at least an 'output' (or 'state') role")
    a = {k: v[None] for k, v in arrays.items()}
    extra = {"source": os.fspath(path), **(attrs or {})}
    if _make_dataset is not None:
        return _make_dataset(
            state[None],
            input=a.get("input"),
            output=a.get("output"),
            dt=float(dt),
            system=system,
            units=units,
            attrs=extra,
        )
    import json  # minimal fallback following the same convention

    import xarray as xr

    dims = {"state": "state_dim", "input": "input_dim", "output": "output_dim"}
    data = {"state": (("episode", "time", "state_dim"), state[None])}
    for k in ("input", "output"):
        if k in a:
            data[k] = (("episode", "time", dims[k]), a[k])
    T = state.shape[0]
    return xr.Dataset(
        data,
        coords={"time": np.arange(T) * float(dt)},
        attrs={"dt": float(dt), "system": system, "units": json.dumps(dict(units or {})), **extra},
    )


def _check_columns(columns, path):
    if not isinstance(columns, Mapping) or not columns:
        raise ReaderError(f"{path}: columns must be a mapping like {{'input': [...], 'output': [...]}}")
    out = {}
    for role, names in columns.items():
        if role not in _ROLES:
            raise ReaderError(f"{path}: unknown role {role!r} in columns; use {_ROLES}")
        if isinstance(names, str | int):
            names = [names]
        if not isinstance(names, Sequence) or len(names) == 0:
            raise ReaderError(f"{path}: columns[{role!r}] must be a non-empty list of column names")
        out[role] = list(names)
    return out


def _check_numeric(role, name, values, path, row_offset=0):
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise ReaderError(
            f"{path}: column {name!r} ({role}) has {int(bad.sum())} NaN/missing sample(s), "
            f"first at data row {i + row_offset}"
        )


def from_csv(
    path,
    *,
    columns: Mapping[str, Sequence[str | int]],
    dt: float,
    units: Mapping[str, str] | None = None,
    skip_rows: int = 0,
    system: str = "",
    delimiter: str | None = None,
    attrs: Mapping[str, Any] | None = None,
):
    """Read a CSV record with a header row into a one-episode dataset.

    ``skip_rows`` lines are skipped before the header. The delimiter is sniffed (``,``, ``;``, tab or spaces)
    unless given. Quoted header names, surrounding spaces and trailing delimiters (an empty last column, as in
    the Silverbox files) are accepted; columns that are not requested may be empty or non-numeric (e.g. flags
    written only in the first row). Requested columns must be numeric with no missing sample.
    """
    path = os.fspath(path)
    cols = _check_columns(columns, path)
    try:
        with open(path, newline="") as fh:
            text = fh.read()
    except OSError as e:
        raise ReaderError(f"{path}: cannot read the file: {e}") from e
    lines = text.splitlines()[skip_rows:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    if len(lines) < 2:
        raise ReaderError(f"{path}: no header and data rows after skipping {skip_rows} line(s)")
    if delimiter is None:
        head = lines[0]
        delimiter = next((d for d in (",", ";", "\t") if d in head), None)
    if delimiter is None:  # whitespace separated
        rows = [ln.split() for ln in lines if ln.strip()]
    else:
        rows = [r for r in csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter) if any(c.strip() for c in r)]
    header = [h.strip().strip('"').strip("'").strip() for h in rows[0]]
    while header and header[-1] == "":
        header.pop()  # trailing delimiter
    body = rows[1:]
    arrays = {}
    for role, names in cols.items():
        block = []
        for name in names:
            if isinstance(name, int):
                if not 0 <= name < len(header):
                    raise ReaderError(f"{path}: column index {name} ({role}) out of range; the header has {header}")
                j, label = name, header[name]
            else:
                if name not in header:
                    raise ReaderError(f"{path}: missing column {name!r} ({role}); the header has {header}")
                j, label = header.index(name), name
            vals = np.empty(len(body))
            for i, r in enumerate(body):
                cell = r[j].strip() if j < len(r) else ""
                if cell == "":
                    vals[i] = np.nan
                    continue
                try:
                    vals[i] = float(cell)
                except ValueError:
                    raise ReaderError(
                        f"{path}: column {label!r} ({role}) has a non-numeric value {cell!r} at data row {i} "
                        f"(file line {skip_rows + i + 2})"
                    ) from None
            _check_numeric(role, label, vals, path)
            block.append(vals)
        arrays[role] = np.stack(block, axis=-1)
    return _build(arrays, dt, units, system, path, {"columns": str(dict(cols)), **(attrs or {})})


def _from_mapping(store, path, cols, dt, units, system, attrs, kind):
    if isinstance(dt, str):
        if dt not in store:
            raise ReaderError(f"{path}: dt names variable {dt!r}, which is missing; the file has {sorted(store)}")
        dt = float(np.asarray(store[dt]).ravel()[0])
    arrays = {}
    n_time = None
    for role, names in cols.items():
        block = []
        for name in names:
            if name not in store:
                raise ReaderError(f"{path}: missing variable {name!r} ({role}); the file has {sorted(store)}")
            v = np.asarray(store[name])
            if not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
                raise ReaderError(f"{path}: variable {name!r} ({role}) is not numeric (dtype {v.dtype})")
            v = v.astype(float)
            if v.ndim == 2 and v.shape[0] == 1 and kind == "mat":  # MATLAB row vector
                v = v.T
            if v.ndim == 1:
                v = v[:, None]
            if v.ndim != 2:
                raise ReaderError(
                    f"{path}: variable {name!r} ({role}) must be 1-D or 2-D (time, channels), got {v.shape}"
                )
            if n_time is None:
                n_time = v.shape[0]
            elif v.shape[0] != n_time:
                raise ReaderError(
                    f"{path}: variable {name!r} ({role}) has {v.shape[0]} samples, others have {n_time}: "
                    "mismatched record lengths"
                )
            for c in range(v.shape[1]):
                _check_numeric(role, name if v.shape[1] == 1 else f"{name}[{c}]", v[:, c], path)
            block.append(v)
        arrays[role] = np.concatenate(block, axis=-1)
    return _build(arrays, dt, units, system, path, {"variables": str(dict(cols)), **(attrs or {})})


def from_npz(
    path,
    *,
    columns: Mapping[str, Sequence[str]],
    dt: float | str,
    units: Mapping[str, str] | None = None,
    system: str = "",
    attrs: Mapping[str, Any] | None = None,
):
    """Read a NumPy ``.npz`` record: ``columns`` maps roles to array names (1-D ``(time,)`` or 2-D
    ``(time, channels)``); ``dt`` is the sampling interval or the name of a scalar array holding it."""
    path = os.fspath(path)
    cols = _check_columns(columns, path)
    try:
        with np.load(path, allow_pickle=False) as z:
            store = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ReaderError(f"{path}: cannot read the .npz file: {e}") from e
    return _from_mapping(store, path, cols, dt, units, system, attrs, "npz")


def from_mat(
    path,
    *,
    columns: Mapping[str, Sequence[str]],
    dt: float | str,
    units: Mapping[str, str] | None = None,
    system: str = "",
    attrs: Mapping[str, Any] | None = None,
):
    """Read a MATLAB ``.mat`` record (``scipy.io.loadmat``, v5/v7); row or column vectors or ``(time,
    channels)`` matrices; ``dt`` is the sampling interval or the name of a scalar variable holding it."""
    import scipy.io

    path = os.fspath(path)
    cols = _check_columns(columns, path)
    try:
        store = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except (OSError, ValueError, NotImplementedError) as e:
        raise ReaderError(f"{path}: cannot read the .mat file: {e}") from e
    return _from_mapping(store, path, cols, dt, units, system, attrs, "mat")
