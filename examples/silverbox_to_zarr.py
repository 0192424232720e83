"""Convert the Silverbox benchmark records (CSV) into the pydso dataset store ``data/silverbox.zarr``.

Source: the "Silverbox" electronic Duffing-oscillator benchmark, T. Wigren and J. Schoukens, "Three free data
sets for development and benchmarking in nonlinear system identification", European Control Conference 2013,
as distributed by the nonlinear system-identification benchmark collection (files ``SNLS80mV.csv`` and
``Schroeder80mV.csv``; read from ``../shared/data/silverbox`` relative to the repository).

The store holds two episodes of 131,072 samples (fs = 10^7 / 2^14 Hz): episode 0 = ``SNLS80mV`` (the arrow
followed by 10 odd random-phase multisines), episode 1 = ``Schroeder80mV``. Values are stored as float32: the
CSV carries at most 5 significant digits, so nothing is lost, and the store stays commit-sized (~2-3 MB).

Split indices (episode 0; half-open ``[start, end)`` sample ranges, in the store attributes):

* ``test_arrow = [0, 40000)`` — the arrow: filtered Gaussian noise with growing amplitude (the usual test set);
* ``test_arrow_no_extrapolation = [0, N)`` with N the first sample where ``|y|`` exceeds the largest ``|y|`` of
  the estimation part (data-driven; 30,981 with these files): the arrow without its extrapolation tail;
* ``estimation = [40586, 127416)`` — the 10 multisine realisations with the short gaps between them, found as
  the first/last of the quiet stretches where the input sits at its DC level (detected below, checked here).

Run: ``python examples/silverbox_to_zarr.py`` (overwrites ``data/silverbox.zarr``).
"""

import json
import sys
from pathlib import Path

import numpy as np

import pydso  # noqa: F401
from pydso.data import from_csv, make_dataset, save

REPO = Path(__file__).resolve().parents[1]
SRC = REPO.parent / "shared" / "data" / "silverbox"
OUT = REPO / "data" / "silverbox.zarr"
FS = 1e7 / 2**14


def quiet_runs(u, level, tol=1.5e-3, min_len=10):
    q = np.abs(u - level) < tol
    runs, i = [], 0
    while i < len(q):
        if q[i]:
            j = i
            while j < len(q) and q[j]:
                j += 1
            if j - i >= min_len:
                runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def splits(u, y):
    seg = u[40000:41000]
    win = np.lib.stride_tricks.sliding_window_view(seg, 16)
    level = float(np.median(win[np.argmin(win.std(axis=1))]))  # DC level of the input in the first gap
    runs = [r for r in quiet_runs(u, level) if r[0] > 35000 and r[1] - r[0] >= 80][:11]
    est = (runs[0][1], runs[-1][0])  # after the first gap, up to the 11th (the end of the 10th multisine)
    ymax = np.abs(y[est[0] : est[1]]).max()
    n_noex = int(np.argmax(np.abs(y[:40000]) > ymax)) or 40000
    return {
        "test_arrow": [0, 40000],
        "test_arrow_no_extrapolation": [0, n_noex],
        "estimation": [int(est[0]), int(est[1])],
        "multisine_gaps": [[int(a), int(b)] for a, b in runs],
    }


def main() -> int:
    files = ["SNLS80mV.csv", "Schroeder80mV.csv"]
    if not all((SRC / f).exists() for f in files):
        print(f"Silverbox CSV files not found in {SRC}: nothing to convert", file=sys.stderr)
        return 1
    dt = 1.0 / FS
    recs = [from_csv(SRC / f, columns={"input": ["V1"], "output": ["V2"]}, dt=dt) for f in files]
    u = np.concatenate([r["input"].values for r in recs]).astype(np.float32)
    y = np.concatenate([r["output"].values for r in recs]).astype(np.float32)
    sp = splits(recs[0]["input"].values[0, :, 0], recs[0]["output"].values[0, :, 0])
    assert sp["estimation"] == [40586, 127416], sp["estimation"]
    ds = make_dataset(
        y,
        input=u,
        output=y,
        dt=dt,
        system="silverbox",
        units={"input": "V", "output": "V", "state": "V", "time": "s"},
        attrs={
            "episodes": json.dumps(["SNLS80mV", "Schroeder80mV"]),
            "splits": json.dumps(sp),
            "fs_hz": FS,
            "state_note": "state = output (measured record, the state is unknown)",
            "source": "Wigren & Schoukens, ECC 2013, Silverbox benchmark (SNLS80mV.csv, Schroeder80mV.csv)",
        },
    )
    save(ds, OUT, overwrite=True)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1e6:.2f} MB); splits: { {k: v for k, v in sp.items() if k != 'multisine_gaps'} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
