"""System identification benchmark: pydso Levenberg-Marquardt vs SciPy, and batch throughput on Dask.

1. One fit, same model and data: a forced Duffing oscillator ``y'' + d y' + k y + k3 y^3 = g u`` (state and
   initial state estimated: 4 parameters + 2 initial states), 500 samples with measurement noise, input fed by
   linear interpolation.
   * pydso: ``pydso.problems.sysid.fit`` (fixed-step RK4 by the JAX backend's ``fixed_step_ensemble``,
     ``pydso.LevenbergMarquardt`` (optimistix's LM steps) in one compiled loop, forward-mode Jacobian);
     timed cold (including compilation) and warm (a second fit, compiled code reused);
   * SciPy: ``scipy.optimize.least_squares(method='lm')`` on residuals computed by ``solve_ivp`` (RK45,
     rtol 1e-8, atol 1e-10, input by ``np.interp``), finite-difference Jacobian with ``diff_step=1e-3``
     (smaller steps drown in the adaptive solver's noise: with SciPy's default or 1e-5/1e-6 LM stalls near the
     initial guess).
   Both start from the same initial guess; the estimates are compared.
2. Batch: experiments per second of ``pydso.problems.sysid.fit_many`` on 200 small experiments (100 samples
   each), with 1 and 2 Dask worker processes (workers warmed up first: compile time excluded and reported
   separately), and with the in-process threaded default (1 and 2 threads, compiled once beforehand).

3. Recompilation (``--recompile``): compile cost of changing ``max_steps`` / tolerances, before (static) and after
   (traced), see :func:`bench_recompile`; writes ``benchmarks/results/sysid_recompile.json``.

Writes ``benchmarks/results/sysid.json``. Run: ``python benchmarks/bench_sysid.py``.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import pydso  # noqa: F401
from pydso.data import make_dataset
from pydso.problems import sysid as S

HERE = Path(__file__).resolve().parent
TRUE = {"d": 0.3, "k": 1.7, "k3": 0.8, "g": 1.2}
GUESS = {"d": 0.5, "k": 2.0, "k3": 0.3, "g": 1.0}
X0 = [0.5, -0.2]


def duffing(t, x, u, th):
    return jnp.array([x[1], -th["d"] * x[1] - th["k"] * x[0] - th["k3"] * x[0] ** 3 + th["g"] * u[0]])


def first_output(x, u, th):
    return x[:1]


def make_model(input="linear"):
    return S.ContinuousModel(
        duffing, first_output, GUESS, x0=[0.0, 0.0], transforms={"d": "positive", "k": "positive"}, input=input
    )


def make_batch_model():
    return make_model("zoh")


def data(T, dt, E=1, seed=0, noise=0.01, truth=None, input="linear"):
    import jax

    rng = np.random.default_rng(seed)
    u = rng.normal(size=(E, T, 1))
    truth = truth or {k: np.full(E, v) for k, v in TRUE.items()}
    m = make_model(input)
    sim = jax.vmap(lambda th, uu: S.simulate_outputs(m, th, jnp.asarray([X0]), uu[None], dt=dt)[0][0])
    y = np.asarray(sim(jax.tree.map(jnp.asarray, truth), jnp.asarray(u))) + noise * rng.normal(size=(E, T, 1))
    return u, y


def bench_single(T=500, dt=0.05):
    from scipy.integrate import solve_ivp
    from scipy.optimize import least_squares

    u, y = data(T, dt)
    ds = make_dataset(y, input=u, output=y, dt=dt)
    model = make_model()
    tic = time.perf_counter()
    r_cold = S.fit(model, ds)
    cold = time.perf_counter() - tic
    warm_times = []
    for _ in range(3):
        tic = time.perf_counter()
        r = S.fit(model, ds)
        warm_times.append(time.perf_counter() - tic)
    warm = min(warm_times)

    ts = np.arange(T) * dt
    uu, yy = u[0, :, 0], y[0, :, 0]

    def rhs(t, x, p):
        d, k, k3, g = p
        return [x[1], -d * x[1] - k * x[0] - k3 * x[0] ** 3 + g * np.interp(t, ts, uu)]

    def resid(q):
        sol = solve_ivp(rhs, (0, ts[-1]), q[4:], t_eval=ts, args=(q[:4],), rtol=1e-8, atol=1e-10)
        if not sol.success or sol.y.shape[1] != T:
            return np.full(T, 1e3)
        return sol.y[0] - yy

    q0 = np.array([GUESS["d"], GUESS["k"], GUESS["k3"], GUESS["g"], 0.0, 0.0])
    tic = time.perf_counter()
    sp = least_squares(resid, q0, method="lm", xtol=1e-10, ftol=1e-10, diff_step=1e-3)
    t_scipy = time.perf_counter() - tic
    est_scipy = dict(zip(["d", "k", "k3", "g"], map(float, sp.x[:4]), strict=True))
    est_pydso = {k: float(v) for k, v in r.as_dict().items()}
    return {
        "samples": T,
        "pydso_cold_s": cold,
        "pydso_warm_s": warm,
        "pydso_lm_steps": r.n_steps,
        "scipy_s": t_scipy,
        "scipy_nfev": int(sp.nfev),
        "ratio_scipy_over_pydso_warm": t_scipy / warm,
        "ratio_scipy_over_pydso_cold": t_scipy / cold,
        "estimates_pydso": est_pydso,
        "estimates_scipy": est_scipy,
        "max_rel_diff_estimates": max(abs(est_pydso[k] - est_scipy[k]) / abs(est_scipy[k]) for k in est_scipy),
        "pydso_cold_same_as_warm": bool(np.allclose(r_cold.estimate, r.estimate)),
    }


def bench_batch(E=200, T=100, dt=0.1):
    from dask.distributed import Client, LocalCluster

    from pydso.problems.sysid import fit_many
    from pydso.problems.sysid._batch import fit_one

    rng = np.random.default_rng(1)
    truth = {
        "d": rng.uniform(0.2, 0.6, E),
        "k": rng.uniform(1.0, 3.0, E),
        "k3": rng.uniform(0.5, 2.0, E),
        "g": rng.uniform(1.0, 2.0, E),
    }
    u, y = data(T, dt, E=E, seed=2, noise=0.02, truth=truth, input="zoh")
    ds = make_dataset(y, input=u, output=y, dt=dt)
    spec = f"{Path(__file__).resolve()}:make_batch_model"
    out = {}
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
            with Client(cl) as client:
                tic = time.perf_counter()
                client.run(fit_one, spec, "warm", ds.isel(episode=[0]), None, "simulation", None)
                warmup = time.perf_counter() - tic
                tic = time.perf_counter()
                res = fit_many(spec, ds, client=client, progress=False)
                wall = time.perf_counter() - tic
        ok = int((res["status"].values == "ok").sum())
        out[f"processes_{n}"] = {
            "experiments": E,
            "ok": ok,
            "wall_s": wall,
            "experiments_per_s": E / wall,
            "worker_warmup_compile_s": warmup,
        }
    tic = time.perf_counter()
    fit_many(spec, ds.isel(episode=[0]), n_workers=1, progress=False)  # compile once in this process
    out["threads_warmup_compile_s"] = time.perf_counter() - tic
    for n in (1, 2):
        tic = time.perf_counter()
        res = fit_many(spec, ds, n_workers=n, progress=False)  # in-process threads, compiled code shared
        wall = time.perf_counter() - tic
        out[f"threads_{n}"] = {"experiments": E, "wall_s": wall, "experiments_per_s": E / wall}
    out["speedup_2_vs_1_processes"] = out["processes_2"]["experiments_per_s"] / out["processes_1"]["experiments_per_s"]
    return out


def bench_recompile(T=500, dt=0.05):
    """Compile cost of changing ``max_steps`` / tolerances between fits (issue 12: a 15-25 s recompilation).

    *before*: the old compiled solve, keyed on ``max_steps`` (a static Python int) and on the method's float
    ``rtol``/``atol`` (static fields), reproduced by ``equinox.filter_jit`` over the same solve body; *after*:
    :func:`pydso.optimize.solve_least_squares`, where both are traced values. Each row: wall time of the first
    call (compile + solve) and of calls with a changed ``max_steps`` and changed tolerances, and the number of
    XLA compilations during the changed calls (``jax.monitoring``)."""
    import equinox as eqx
    import jax

    from pydso.optimize import _least_squares as ls

    u, y = data(T, dt)
    p = S.sysid(make_model(), pydso.data.make_dataset(y, input=u, output=y, dt=dt))
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    old_solve = eqx.filter_jit(ls._solve_traced)  # the old keying: python int max_steps, float tolerances

    def run(fn):
        t = time.perf_counter()
        n0 = len(compiles)
        jax.block_until_ready(fn().theta)
        return {"wall_s": time.perf_counter() - t, "compilations": len(compiles) - n0}

    out = {}
    try:
        for label, call in (
            ("before", lambda steps, tol: old_solve(pydso.LevenbergMarquardt(tol, tol), p, p.theta0, steps)),
            (
                "after",
                lambda steps, tol: ls.solve_least_squares(
                    p, p.theta0, method=pydso.LevenbergMarquardt(tol, tol), max_steps=steps
                ),
            ),
        ):
            out[label] = {
                "first_call": run(lambda call=call: call(100, 1e-10)),
                "max_steps_changed": run(lambda call=call: call(101, 1e-10)),
                "tolerances_changed": run(lambda call=call: call(101, 1e-9)),
            }
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out


def main() -> int:
    if "--recompile" in sys.argv:
        res = bench_recompile()
        print(json.dumps(res, indent=2))
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "sysid_recompile.json").write_text(json.dumps(res, indent=2))
        return 0
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "single_fit": bench_single(),
    }
    print(json.dumps(results["single_fit"], indent=2))
    results["batch"] = bench_batch()
    print(json.dumps(results["batch"], indent=2))
    try:
        results["machine"]["load_average"] = os.getloadavg()
    except OSError:
        pass
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "sysid.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
