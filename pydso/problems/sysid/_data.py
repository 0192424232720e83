"""Data extraction: turns a pydso dataset (``xarray.Dataset``) into the arrays of an identification problem
(input, output, sample times, measured states) and checks it is usable.
"""

from __future__ import annotations

import numpy as np

from ._errors import SysIdError
from ._models import DiscreteModel


def extract_arrays(data, model):
    """Arrays from a pydso dataset: u (E,T,nu), y (E,T,ny), ts (T,), dt, measured state or None."""
    import xarray as xr

    if not isinstance(data, xr.Dataset):
        raise SysIdError(f"data must be a pydso dataset (xarray.Dataset), got {type(data).__name__}")
    if "output" not in data.data_vars:
        raise SysIdError(
            f"dataset has no 'output' variable (has {sorted(data.data_vars)}): sysid compares the model output "
            "with the recorded output"
        )
    for name in ("output", "input"):
        if name in data.data_vars:
            dims = tuple(data[name].dims)
            if "time" not in dims or "episode" not in dims:
                raise SysIdError(
                    f"variable {name!r} has dimensions {dims}: sysid needs ('episode', 'time', ...) for both 'input' "
                    "and 'output' on the same 'time' axis (input and output on different time axes must be "
                    "resampled onto one time coordinate first)"
                )
    y = np.asarray(data["output"].transpose("episode", "time", ...).values, dtype=float)
    if y.ndim == 2:
        y = y[..., None]
    E, T, ny = y.shape
    if "input" in data.data_vars:
        u = np.asarray(data["input"].transpose("episode", "time", ...).values, dtype=float)
        if u.ndim == 2:
            u = u[..., None]
        if u.shape[:2] != (E, T):
            raise SysIdError(f"'input' has shape {u.shape} but 'output' has {(E, T)} episodes x time samples")
    elif model.autonomous:
        u = np.zeros((E, T, 0))
    else:
        raise SysIdError(
            f"dataset has no 'input' variable (has {sorted(data.data_vars)}): sysid drives the model with the "
            "recorded input (build the model with autonomous=True for a system without input)"
        )
    if T > 1 and np.isnan(u[:, -1]).any() and np.isfinite(u[:, :-1]).all():
        u = u.copy()
        u[:, -1] = u[:, -2]  # schema convention: the input of the last (unused) step may be NaN
    if "mask" in data.data_vars and not np.asarray(data["mask"].values, bool).all():
        raise SysIdError(
            "dataset has ragged episodes ('mask' is False somewhere): sysid needs complete, equal-length "
            "episodes; split or trim them first"
        )
    for name, arr in (("input", u), ("output", y)):
        bad = ~np.isfinite(arr)
        if bad.any():
            e, t, c = np.argwhere(bad)[0]
            raise SysIdError(
                f"variable {name!r} has {int(bad.sum())} NaN/inf sample(s), first at episode {e}, time index {t}, "
                f"channel {c}: remove or interpolate them before identification"
            )
    if T < 3:
        raise SysIdError(f"dataset has only {T} time samples; sysid needs at least 3")
    if "time" in data.coords:
        ts = np.asarray(data["time"].values, dtype=float)
        d = np.diff(ts)
        dt = float(np.median(d))
        if not (np.isfinite(dt) and dt > 0) or np.max(np.abs(d - dt)) > 1e-6 * abs(dt):
            raise SysIdError(
                f"mismatched sample times: the 'time' coordinate is not uniformly spaced (steps from {d.min():g} "
                f"to {d.max():g}); resample the data to one sample time"
            )
    else:
        dt = float(data.attrs.get("dt", 1.0))
        ts = np.arange(T) * dt
    if "dt" in data.attrs and abs(float(data.attrs["dt"]) - dt) > 1e-6 * dt:
        raise SysIdError(f"mismatched sample times: attrs['dt'] = {data.attrs['dt']} but the time coordinate has {dt}")
    if isinstance(model, DiscreteModel) and model.dt is not None and abs(model.dt - dt) > 1e-9 * dt:
        raise SysIdError(f"mismatched sample times: the discrete model was built for dt = {model.dt}, data have {dt}")
    xs = None
    if "state" in data.data_vars:
        xm = np.asarray(data["state"].transpose("episode", "time", ...).values, dtype=float)
        if xm.ndim == 3 and xm.shape[-1] == model.n_states and np.all(np.isfinite(xm)):
            xs = xm
    return u, y, ts, dt, xs
