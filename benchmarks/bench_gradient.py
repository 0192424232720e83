"""Pathwise gradient cost of the fixed-step fast path vs horizon, with and without checkpointing.

Damped pendulum (d=2; stable gradients at long horizons), RK4, dt=0.01, N=256 trajectories, quadratic running
cost integrated as an augmented state. For T in {1e2, 1e3, 1e4} steps: forward time, gradient time (jax.grad
w.r.t. theta), their ratio, compile times and XLA's ``compiled.memory_analysis()`` temp size of the gradient,
without checkpointing and with ``checkpoints = round(sqrt(T))``.

Usage: python benchmarks/bench_gradient.py [--n 256] [--horizons 100 1000 10000]
"""

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pydso  # noqa: F401  (enables fp64)
from pydso.backends.jax import RK4, fixed_step_ensemble

DT = 0.01


def pendulum(t, x, th):
    return jnp.stack([x[1], -th[0] * jnp.sin(x[0]) - th[1] * x[1]])


def cost(x, th):
    return x[0] ** 2 + 0.1 * x[1] ** 2


def best(fn, reps=3):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return min(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--horizons", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gradient.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.normal(size=(args.n, 2)))
    th = jnp.array([9.81, 0.3])
    rows = []
    for T in args.horizons:
        for ck in (None, max(2, round(T**0.5))):

            def objective(th, T=T, ck=ck):
                s, c = fixed_step_ensemble(
                    pendulum, x0, th, dt=DT, n_steps=T, solver=RK4(), cost=cost, save_every=T, checkpoints=ck
                )
                return jnp.mean(c[:, 0] + jnp.sum(s[:, -1] ** 2, -1))

            t = time.perf_counter()
            fwd = jax.jit(objective).lower(th).compile()
            c_fwd = time.perf_counter() - t
            t = time.perf_counter()
            grd = jax.jit(jax.grad(objective)).lower(th).compile()
            c_grd = time.perf_counter() - t
            fwd(th), grd(th)
            reps = 3 if T < 10_000 else 2
            t_f, t_g = best(lambda fwd=fwd: fwd(th), reps), best(lambda grd=grd: grd(th), reps)
            mem = grd.memory_analysis()
            row = {
                "T": T,
                "N": args.n,
                "checkpoints": ck,
                "forward_s": t_f,
                "grad_s": t_g,
                "grad_over_forward": t_g / t_f,
                "compile_forward_s": c_fwd,
                "compile_grad_s": c_grd,
                "grad_temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
                "grad_argument_bytes": int(mem.argument_size_in_bytes) if mem is not None else None,
                "grad_is_finite": bool(np.all(np.isfinite(np.asarray(grd(th))))),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "pathwise gradient, damped pendulum, RK4, dt=0.01, fast path",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "loadavg": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| T | checkpoints | forward (ms) | grad (ms) | grad/forward | grad temp memory (MB) | compile grad (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mb = r["grad_temp_bytes"] / 1e6 if r["grad_temp_bytes"] is not None else float("nan")
        print(
            f"| {r['T']} | {r['checkpoints'] or '-'} | {1e3 * r['forward_s']:.2f} | {1e3 * r['grad_s']:.2f} "
            f"| {r['grad_over_forward']:.2f} | {mb:.2f} | {r['compile_grad_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
