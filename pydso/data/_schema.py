"""The trajectory dataset schema: constants, :func:`validate`, :func:`make_dataset`, :func:`to_dataset`.

See the docstring of :mod:`pydso.data` for the conventions. This module imports no other part of pydso.
"""

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import xarray as xr

from .._errors import ProblemError

__all__ = [
    "SCHEMA_VERSION",
    "DatasetError",
    "VARIABLE_DIMS",
    "validate",
    "make_dataset",
    "to_dataset",
    "episode_lengths",
]

SCHEMA_VERSION = 1
"""The schema version written by this version of pydso (attribute ``pydso_schema_version``)."""

VARIABLE_DIMS: dict[str, tuple[str, ...]] = {
    "state": ("episode", "time", "state_dim"),
    "input": ("episode", "time", "input_dim"),
    "output": ("episode", "time", "output_dim"),
    "cost": ("episode", "time"),
    "behavior_logp": ("episode", "time"),
    "mask": ("episode", "time"),
    "terminal_cost": ("episode",),
}
"""The dimensions, in order, of every variable the schema knows."""

STEP_VARIABLES = ("cost", "behavior_logp", "input")
"""Per-transition variables: the value at time index ``t`` belongs to the step ``x_t -> x_{t+1}``."""

_VALUE_CHUNK_BYTES = 64 * 2**20


class DatasetError(ProblemError):
    """A trajectory dataset or store does not follow the pydso schema; the message names the variable (or
    attribute, or path) and the problem. A :class:`pydso.ProblemError` (and so a ``ValueError``)."""


# ------------------------------------------------------------------------------------------- validation
def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


def _is_int(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and not np.issubdtype(dtype, np.bool_)


def _check_json_attr(ds: xr.Dataset, name: str) -> Any:
    value = ds.attrs[name]
    if not isinstance(value, str):
        raise DatasetError(
            f"attribute {name!r} must be a JSON string, got {type(value).__name__} {value!r:.80}; use json.dumps(...)"
        )
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DatasetError(f"attribute {name!r} is not valid JSON ({e}): {value!r:.80}") from None


def _check_attrs(ds: xr.Dataset) -> None:
    if "pydso_schema_version" not in ds.attrs:
        raise DatasetError(
            "attribute 'pydso_schema_version' is missing: not a pydso trajectory dataset "
            f"(build one with pydso.data.make_dataset, or set ds.attrs['pydso_schema_version'] = {SCHEMA_VERSION})"
        )
    version = ds.attrs["pydso_schema_version"]
    if isinstance(version, bool) or not isinstance(version, int | np.integer):
        raise DatasetError(f"attribute 'pydso_schema_version' must be an integer, got {version!r}")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"attribute 'pydso_schema_version' is {int(version)}, but this pydso reads schema version "
            f"{SCHEMA_VERSION} only"
        )
    if "system" in ds.attrs and not isinstance(ds.attrs["system"], str):
        raise DatasetError(f"attribute 'system' must be a string, got {ds.attrs['system']!r}")
    if "parameters" in ds.attrs:
        _check_json_attr(ds, "parameters")
    if "units" in ds.attrs:
        units = _check_json_attr(ds, "units")
        if not isinstance(units, dict) or not all(isinstance(v, str) for v in units.values()):
            raise DatasetError(f"attribute 'units' must be a JSON object mapping names to unit strings: {units!r}")
        unknown = sorted(set(units) - set(ds.variables))
        if unknown:
            raise DatasetError(f"attribute 'units' names unknown variable(s) {unknown}; known: {sorted(ds.variables)}")
    if "dt" in ds.attrs:
        dt = ds.attrs["dt"]
        if isinstance(dt, bool) or not isinstance(dt, int | float | np.number) or not (math.isfinite(dt) and dt > 0):
            raise DatasetError(f"attribute 'dt' must be a positive finite number, got {dt!r}")


def _check_structure(ds: xr.Dataset) -> None:
    if not isinstance(ds, xr.Dataset):
        raise DatasetError(f"expected an xarray.Dataset, got {type(ds).__name__}")
    if "state" not in ds.data_vars:
        raise DatasetError(f"variable 'state' (episode, time, state_dim) is missing; found {sorted(ds.data_vars)}")
    for name, var in ds.data_vars.items():
        expected = VARIABLE_DIMS.get(str(name))
        if expected is not None and var.dims != expected:
            hint = " (transpose it: ds[name].transpose(*dims))" if set(var.dims) == set(expected) else ""
            raise DatasetError(f"variable {name!r} has dims {var.dims}; expected {expected}{hint}")
        if expected is None and (not var.dims or var.dims[0] != "episode"):
            raise DatasetError(
                f"variable {name!r} has dims {var.dims}; every data variable must have 'episode' as its first "
                "dimension (so that datasets can be appended along episodes)"
            )
    dtype = ds["state"].dtype
    if not (_is_float(dtype) or _is_int(dtype)):
        raise DatasetError(f"variable 'state' has dtype {dtype}; expected a float dtype (or an integer dtype)")
    for name in ("cost", "behavior_logp", "terminal_cost"):
        if name in ds.data_vars and not _is_float(ds[name].dtype):
            raise DatasetError(f"variable {name!r} has dtype {ds[name].dtype}; expected a float dtype")
    for name in ("input", "output"):
        if name in ds.data_vars and not (_is_float(ds[name].dtype) or _is_int(ds[name].dtype)):
            raise DatasetError(f"variable {name!r} has dtype {ds[name].dtype}; expected a float or integer dtype")
    if "mask" in ds.data_vars and ds["mask"].dtype != np.bool_:
        raise DatasetError(f"variable 'mask' has dtype {ds['mask'].dtype}; expected bool")
    if ds.sizes["episode"] == 0:
        raise DatasetError("dimension 'episode' has size 0: a dataset needs at least one episode")
    if "time" not in ds.coords:
        raise DatasetError("coordinate 'time' is missing (float seconds or integer step index, strictly increasing)")
    time = ds.coords["time"]
    if time.dims != ("time",):
        raise DatasetError(f"coordinate 'time' has dims {time.dims}; expected ('time',)")
    if not (_is_float(time.dtype) or _is_int(time.dtype)):
        raise DatasetError(f"coordinate 'time' has dtype {time.dtype}; expected float seconds or integer steps")
    t = np.asarray(time.values)
    if not np.all(np.isfinite(t)):
        raise DatasetError("coordinate 'time' contains non-finite values")
    if t.size > 1 and not np.all(np.diff(t) > 0):
        i = int(np.argmax(~(np.diff(t) > 0)))
        raise DatasetError(
            f"coordinate 'time' is not strictly increasing: time[{i}] = {t[i]} >= time[{i + 1}] = {t[i + 1]}"
        )
    _check_attrs(ds)


def _nan_tails(bad: np.ndarray) -> np.ndarray:
    """Per episode: True if the non-finite entries of (episode, time) form a non-empty tail."""
    any_bad = bad.any(axis=1)
    first = np.where(any_bad, bad.argmax(axis=1), bad.shape[1])
    tail = np.arange(bad.shape[1])[None, :] >= first[:, None]
    return any_bad & np.all(bad == tail, axis=1)


def _check_values(chunk: xr.Dataset, offset: int) -> None:
    """Value checks on an in-memory chunk of episodes starting at global episode ``offset``."""
    n_time = chunk.sizes["time"]
    if "mask" in chunk.data_vars:
        mask = np.asarray(chunk["mask"].values)
        if not mask[:, 0].all():
            e = int(np.argmin(mask[:, 0]))
            raise DatasetError(f"variable 'mask' is False at time index 0 of episode {offset + e}: empty episode")
        prefix = np.minimum.accumulate(mask, axis=1)
        if not np.array_equal(prefix, mask):
            e = int(np.argmax(np.any(prefix != mask, axis=1)))
            raise DatasetError(
                f"variable 'mask' of episode {offset + e} is not of the form True...True False...False; "
                "an episode must be a contiguous run of time steps starting at time index 0"
            )
    else:
        mask = None
    state = np.asarray(chunk["state"].values)
    if _is_float(state.dtype):
        bad = ~np.isfinite(state).all(axis=2)
        if mask is None:
            if bad.any():
                tails = _nan_tails(bad)
                if tails.any():
                    eps = [offset + int(e) for e in np.flatnonzero(tails)[:5]]
                    raise DatasetError(
                        f"variable 'state' ends in NaN in episode(s) {eps}{'...' if tails.sum() > 5 else ''} "
                        "(ragged episodes?); add a boolean variable 'mask' (episode, time) that is True on the "
                        "recorded steps and False on the padding"
                    )
                e, t = np.argwhere(bad)[0]
                raise DatasetError(
                    f"variable 'state' has NaN/inf at episode {offset + int(e)}, time index {int(t)} "
                    f"({int(bad.sum())} step(s) affected); states must be finite (use 'mask' for padding)"
                )
        elif (bad & mask).any():
            e, t = np.argwhere(bad & mask)[0]
            raise DatasetError(
                f"variable 'state' has NaN/inf where 'mask' is True: episode {offset + int(e)}, time index {int(t)}"
            )
    if n_time > 1:
        step = np.ones((chunk.sizes["episode"], n_time - 1), bool) if mask is None else mask[:, :-1] & mask[:, 1:]
        for name in STEP_VARIABLES:
            if name not in chunk.data_vars:
                continue
            values = np.asarray(chunk[name].values)
            if not _is_float(values.dtype):
                continue
            finite = np.isfinite(values[:, :-1])
            if finite.ndim == 3:
                finite = finite.all(axis=2)
            if (~finite & step).any():
                e, t = np.argwhere(~finite & step)[0]
                raise DatasetError(
                    f"variable {name!r} has NaN/inf at episode {offset + int(e)}, time index {int(t)}, a recorded "
                    f"step; {name!r} must be finite on every step x_t -> x_(t+1) of an episode (only the last time "
                    "index and masked steps may hold NaN)"
                )
    if "terminal_cost" in chunk.data_vars:
        tc = np.asarray(chunk["terminal_cost"].values)
        if not np.isfinite(tc).all():
            e = int(np.argmin(np.isfinite(tc)))
            raise DatasetError(f"variable 'terminal_cost' has NaN/inf at episode {offset + e}")


def _value_chunks(ds: xr.Dataset) -> Iterator[tuple[int, xr.Dataset]]:
    names = [n for n in ("state", "mask", "terminal_cost", *STEP_VARIABLES) if n in ds.data_vars]
    sub = ds[names]
    per_episode = sum(v.dtype.itemsize * math.prod(v.shape[1:]) for v in sub.data_vars.values())
    n = ds.sizes["episode"]
    if all(v.chunks is None for v in sub.data_vars.values()):
        k = n
    else:
        k = max(1, _VALUE_CHUNK_BYTES // max(per_episode, 1))
    for start in range(0, n, k):
        try:
            chunk = sub.isel(episode=slice(start, start + k)).compute()
        except Exception as e:  # noqa: BLE001 - an unreadable stored chunk: a pydso error, not a codec traceback
            raise DatasetError(
                f"could not read episodes {start}..{min(start + k, n) - 1} ({type(e).__name__}: {str(e)[:200]}); "
                "a stored chunk is damaged: pydso.data.validate(path) names it"
            ) from None
        yield start, chunk


def validate(ds: "xr.Dataset | str | os.PathLike", *, check_values: bool = True) -> xr.Dataset:
    """Check that ``ds`` follows the pydso trajectory schema and return it unchanged.

    **Arguments:**

    - `ds`: the dataset, or the path of a store: then every stored file is first checked against the size and
        BLAKE2b hash recorded in the store's manifest (``pydso.data.open(path, verify=True)``), so a missing,
        truncated or damaged chunk is named (store, part, variable, chunk) instead of reading as NaN, and the
        opened dataset is validated and returned.
    - `check_values`: also check the values (finite states where recorded, finite step quantities on recorded
        steps, the form of ``mask``). For a lazily opened (dask) dataset this reads it once, a bounded number
        of episodes at a time. With ``False`` only dimensions, dtypes, the ``time`` coordinate and the
        attributes are checked (no data is read).

    **Returns:**

    ``ds`` itself.

    **Raises:**

    :class:`DatasetError` naming the variable, coordinate or attribute and the problem.
    """
    if isinstance(ds, str | os.PathLike):
        from ._store import open as open_store

        ds = open_store(ds, verify=True)
    _check_structure(ds)
    if check_values:
        for offset, chunk in _value_chunks(ds):
            _check_values(chunk, offset)
    return ds


# ------------------------------------------------------------------------------------------- construction
def _to_json(value: Any) -> Any:
    """Convert a parameter pytree of arrays / numbers / dicts / sequences into JSON-able data."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__") and hasattr(value, "dtype"):
        return np.asarray(value).tolist()
    try:  # any other pytree (an equinox Module, a NamedTuple of arrays, ...): its leaves, in order
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(value)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise DatasetError(f"parameters: cannot convert {type(value).__name__} to JSON ({e})") from None
    if len(leaves) == 1 and leaves[0] is value:  # an opaque object: not a pytree of numbers
        raise DatasetError(
            f"parameters: cannot store a {type(value).__name__} as JSON; pass a pytree of arrays/numbers (dict, "
            "list, equinox module), a JSON string, or None"
        )
    return {"leaves": [_to_json(leaf) for leaf in leaves], "treedef": str(treedef)}


def _parameters_json(parameters: Any) -> str:
    if isinstance(parameters, str):
        try:
            json.loads(parameters)
        except json.JSONDecodeError as e:
            raise DatasetError(f"parameters: a string must be valid JSON ({e}): {parameters!r:.80}") from None
        return parameters
    return json.dumps(_to_json(parameters))


def _array(value: Any, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != ndim:
        dims = VARIABLE_DIMS[name]
        raise DatasetError(f"variable {name!r} must have {ndim} dimensions {dims}, got shape {a.shape}")
    return a


def make_dataset(
    state: Any,
    *,
    input: Any = None,
    output: Any = None,
    cost: Any = None,
    behavior_logp: Any = None,
    mask: Any = None,
    terminal_cost: Any = None,
    time: Any = None,
    dt: float | None = None,
    system: str = "",
    parameters: Any = None,
    units: Mapping[str, str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Build a validated trajectory dataset from arrays.

    **Arguments:**

    - `state`: ``(episode, time, state_dim)`` float (or integer) states.
    - `input`: optional ``(episode, time, input_dim)`` inputs; ``input[:, t]`` drives the step ``t -> t+1``.
    - `output`: optional ``(episode, time, output_dim)`` measurements (NaN = missing).
    - `cost`: optional ``(episode, time)`` step costs; ``cost[:, t]`` is the cost of the step ``t -> t+1``
        (the last time index is unused: NaN).
    - `behavior_logp`: optional ``(episode, time)`` log-density of the logged transition ``x_t -> x_{t+1}``
        under the behaviour chain (last time index unused: NaN).
    - `mask`: optional ``(episode, time)`` bool, True on the recorded states of each (ragged) episode.
    - `terminal_cost`: optional ``(episode,)`` terminal cost paid at each episode's last recorded state.
    - `time`: optional ``(time,)`` coordinate; default ``arange(T) * dt`` if `dt` is given, else ``arange(T)``.
    - `dt`: optional sampling interval in seconds (stored as the ``dt`` attribute).
    - `system`: name of the system that generated the data.
    - `parameters`: the parameters used (any pytree of arrays/numbers, or a JSON string); stored as JSON.
    - `units`: optional mapping of variable name to unit string.
    - `attrs`: further attributes to store.

    **Returns:**

    An ``xarray.Dataset`` following the schema (see :mod:`pydso.data`).

    **Raises:**

    :class:`DatasetError` if the arrays do not fit the schema.
    """
    if dt is not None and (
        isinstance(dt, bool) or not isinstance(dt, int | float | np.number) or not (math.isfinite(dt) and dt > 0)
    ):
        raise DatasetError(f"dt must be a positive finite number (the sampling interval in seconds), got {dt!r}")
    state = _array(state, "state", 3)
    n, n_time, _ = state.shape
    data = {"state": (VARIABLE_DIMS["state"], state)}
    for name, value, ndim in (
        ("input", input, 3),
        ("output", output, 3),
        ("cost", cost, 2),
        ("behavior_logp", behavior_logp, 2),
        ("mask", mask, 2),
        ("terminal_cost", terminal_cost, 1),
    ):
        if value is None:
            continue
        a = _array(value, name, ndim)
        if a.shape[: min(ndim, 2)] != (n, n_time)[: min(ndim, 2)]:
            raise DatasetError(
                f"variable {name!r} has shape {a.shape}, which does not match 'state' (episode={n}, time={n_time})"
            )
        data[name] = (VARIABLE_DIMS[name], a)
    if time is None:
        time = np.arange(n_time) * float(dt) if dt is not None else np.arange(n_time)
    time = np.asarray(time)
    if time.shape != (n_time,):
        raise DatasetError(f"coordinate 'time' has shape {time.shape}; expected ({n_time},) to match 'state'")
    out_attrs: dict[str, Any] = {
        "pydso_schema_version": SCHEMA_VERSION,
        "system": str(system),
        "parameters": _parameters_json(parameters),
        "units": json.dumps(dict(units or {})),
    }
    if dt is not None:
        out_attrs["dt"] = float(dt)
    out_attrs.update(attrs or {})
    ds = xr.Dataset(data, coords={"time": ("time", time)}, attrs=out_attrs)
    return validate(ds)


def to_dataset(trajectories: Any, problem: Any, theta: Any, *, dt: float | None = None) -> xr.Dataset:
    r"""Record simulated :class:`pydso.Trajectories` as a trajectory dataset.

    **Arguments:**

    - `trajectories`: the output of :func:`pydso.rollout` (any object with ``states``, ``costs``, ``log_probs``,
        ``alive`` and ``terminal_costs`` attributes of the same layout).
    - `problem`: the :class:`pydso.Problem` that was simulated (its ``name``, ``system`` and ``terminal_cost``
        are used).
    - `theta`: the parameters of the rollout; stored as JSON in the ``parameters`` attribute.
    - `dt`: time step in seconds; default ``problem.system.dt`` for ODE/SDE systems, none (integer step index)
        for discrete-time chains.

    **Returns:**

    A validated dataset with ``state`` (``(n, H+1, d)``; a scalar state gets ``state_dim`` of size 1, higher-rank
    states are flattened and the original shape is kept in the ``state_shape`` attribute), ``cost`` and
    ``behavior_logp`` (padded with NaN at the last time index; ``behavior_logp`` only if the system has a
    transition density), ``mask`` (True up to and including the state where the episode entered its terminal
    set) and ``terminal_cost`` (if the problem has one).
    """
    states = np.asarray(trajectories.states)
    n, n_steps = states.shape[:2]
    state_shape = states.shape[2:]
    states = states.reshape(n, n_steps, -1) if state_shape else states[..., None]
    pad = np.full((n, 1), np.nan)
    costs = np.asarray(trajectories.costs)
    cost = np.concatenate([costs, pad.astype(costs.dtype)], axis=1)
    system = getattr(problem, "system", None)
    behavior_logp = None
    if getattr(system, "has_log_prob", True):
        lps = np.asarray(trajectories.log_probs)
        behavior_logp = np.concatenate([lps, pad.astype(lps.dtype)], axis=1)
    alive = np.asarray(trajectories.alive, bool)
    # Recorded states: x_0, and every state reached from an alive one (so the first absorbed state is kept).
    mask = np.concatenate([np.ones((n, 1), bool), alive[:, :-1]], axis=1)
    terminal_cost = None
    if getattr(problem, "terminal_cost", None) is not None:
        terminal_cost = np.asarray(trajectories.terminal_costs)
    if dt is None:
        dt = getattr(system, "dt", None)
    attrs = {} if len(state_shape) == 1 else {"state_shape": json.dumps(list(state_shape))}
    return make_dataset(
        states,
        cost=cost,
        behavior_logp=behavior_logp,
        mask=mask,
        terminal_cost=terminal_cost,
        dt=dt,
        system=str(getattr(problem, "name", "")),
        parameters=theta,
        attrs=attrs,
    )


def episode_lengths(ds: xr.Dataset) -> np.ndarray:
    """Number of recorded states of each episode: ``mask.sum("time")``, or the time length without a mask."""
    if "mask" in ds.data_vars:
        return np.asarray(ds["mask"].sum("time").values)
    return np.full(ds.sizes["episode"], ds.sizes["time"])
