"""Silverbox with the identification workflow of a real data set: multi-start, validation on new data, residual
whiteness and honest intervals.

The grey-box Duffing model of ``examples/sysid_silverbox.py`` (``y'' + d y' + k1 y + k3 y^3 = g u + c``, output
``y + y_off``, input by linear interpolation, RK4 at the sample time) is fitted by simulation error on the
estimation part of SNLS80mV (the 10 multisines) with a **multi-start**: ``N_STARTS`` starting points (the linear
model's parameters with ``k3 = 0``, and random perturbations of them, ``spread`` 0.3 in the unconstrained
coordinates), all solved as one vmapped Levenberg-Marquardt solve; the best by estimation loss is reported with
every start's loss. It is then **validated** on the test arrow (never used for fitting) with the initial state
estimated from the arrow's first ``N_INIT`` samples only (``result.score(arrow, x0="estimate", n_init=N_INIT)``),
on the whole arrow and on the arrow without its extrapolation tail. The residual **whiteness** test and the
covariance used for the intervals (white, or the AR sandwich when the residuals are coloured) are printed.

Run: ``python examples/sysid_silverbox_validation.py [--starts 8] [--max-steps 200] [--samples N]`` (``--samples``
uses only the first N estimation samples: quicker). Writes ``examples/output/silverbox_validation.json``.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

import pydso  # noqa: F401  (float64)
from pydso.problems import sysid as S

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sysid_silverbox as base  # noqa: E402  (the data loader and models of the Silverbox example)

OUT = Path(__file__).resolve().parent / "output" / "silverbox_validation.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=0, help="use only the first N estimation samples (0: all)")
    ap.add_argument("--n-init", type=int, default=100)
    args = ap.parse_args(argv)
    data = base.load()
    if data is None:
        print("Silverbox data not found (data/silverbox.zarr or ../shared/data/silverbox): skipping")
        return 0
    u, y, dt, splits = data
    e0, e1 = splits["estimation"]
    if args.samples:
        e1 = min(e1, e0 + args.samples)
    t0, t1 = splits["test_arrow"]
    n_noex = splits["test_arrow_no_extrapolation"][1]
    ue, ye = u[e0:e1], y[e0:e1]
    est = base.dataset(ue, ye, dt)
    arrow = base.dataset(u[t0:t1], y[t0:t1], dt)
    arrow_noex = base.dataset(u[t0 : t0 + n_noex], y[t0 : t0 + n_noex], dt)
    tr = {"d": "positive", "k1": "positive", "g": "positive"}
    guess = base.arx_guess(ue, ye, dt)
    x0 = [float(ye[0]), float((ye[1] - ye[0]) / dt)]
    lin = S.ContinuousModel(base.f_lin, base.h, {**guess, "y_off": 0.0}, x0=x0, transforms=tr, input="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tic = time.perf_counter()
        r_lin = S.fit(lin, est, max_steps=args.max_steps)
        t_lin = time.perf_counter() - tic
    p = r_lin.as_dict()
    grey = S.ContinuousModel(
        base.f_grey,
        base.h,
        {**{k: p[k] for k in ("d", "k1", "g", "c", "y_off")}, "k3": 0.0},
        x0=r_lin.x0[0],
        transforms=tr,
        input="linear",
        name="grey-box",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tic = time.perf_counter()
        r = S.fit(grey, est, n_starts=args.starts, key=jax.random.key(0), spread=0.3, max_steps=args.max_steps)
        t_grey = time.perf_counter() - tic
    ms = r.multistart
    sc = r.score(arrow, n_init=args.n_init)
    sc_noex = r.score(arrow_noex, n_init=args.n_init)
    w = r.whiteness
    print(f"linear fit: {t_lin:.1f} s, RMSE {r_lin.rmse[0] * 1e3:.3f} mV")
    print(f"grey box, {ms.n_starts} starts as one vmapped solve: {t_grey:.1f} s")
    print(r.summary())
    print(f"validation on the arrow (x0 from its first {args.n_init} samples): {sc}")
    print(f"validation on the arrow without extrapolation: {sc_noex}")
    report = {
        "estimation_samples": int(e1 - e0),
        "starts": ms.n_starts,
        "start_costs": ms.cost.tolist(),
        "start_codes": ms.code.tolist(),
        "best_start": ms.best,
        "best_cost": float(ms.cost[ms.best]),
        "n_at_best": ms.n_at_best(1e-6),
        "start_estimates": {n: ms.estimate[:, i].tolist() for i, n in enumerate(r.names)},
        "estimate": r.as_dict(),
        "stderr": dict(zip(r.names, map(float, r.stderr), strict=True)),
        "ci": {n: [float(lo), float(hi)] for n, lo, hi in zip(r.names, r.ci_low, r.ci_high, strict=True)},
        "covariance": r.covariance,
        "stop_reason": r.stop_reason,
        "grad_cosine": r.grad_cosine,
        "estimation_rmse_mV": float(r.rmse[0] * 1e3),
        "estimation_fit_percent": float(r.fit_percent[0]),
        "whiteness": {
            "lag1": float(w.lag1[0]),
            "share_outside_band": float(np.mean(np.abs(w.acf[0]) > w.band)),
            "q": float(w.q[0]),
            "q_crit": w.q_crit,
            "white": bool(w.white[0]),
            "input_xq": float(w.xq[0, 0]),
            "input_xq_crit": w.xq_crit,
            "independent": bool(w.independent[0, 0]),
        },
        "validation_arrow_rmse_mV": float(sc.rmse[0] * 1e3),
        "validation_arrow_fit_percent": float(sc.fit_percent[0]),
        "validation_arrow_no_extrapolation_rmse_mV": float(sc_noex.rmse[0] * 1e3),
        "validation_arrow_no_extrapolation_fit_percent": float(sc_noex.fit_percent[0]),
        "n_init": args.n_init,
        "warnings": [str(c.message) for c in caught],
        "fit_wall_s": {"linear": t_lin, "grey_multistart": t_grey},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2, default=float))
    print(f"written {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
