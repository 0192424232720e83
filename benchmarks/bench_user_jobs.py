"""The jobs users run, through pydso's public API, each beside plain diffrax doing the same job (issue 14).

Rows (trajectory-steps/s = N * steps / best wall time; best of ``--rounds`` interleaved rounds, one call of each
contender per round; "compile" = first call - best call, so it includes tracing and XLA compilation):

* **objective only**: ``pydso.rollout(problem, theta, key=key, n=N, save="costs").objective`` end to end (finiteness
  check included; the states are never written) vs ``jax.jit(jax.vmap(diffeqsolve))`` with the cost as an
  augmented state, ``SaveAt(t1=True)``; also ``objective_jit``, the same rollout inside the user's ``jax.jit``;
* **every state saved**: ``pydso.rollout(problem, theta, key=key, n=N)`` end to end (finiteness check included) vs
  the same vmapped diffeqsolve with ``SaveAt(ts=every step)``;
* **pathwise gradient**: ``pydso.pathwise_gradient(problem, theta, key=key, n=N)`` (gradient of the mean objective
  and its standard error) vs ``jax.jit(jax.grad(mean of the diffrax objective))`` (``RecursiveCheckpointAdjoint``);
* **kernel, no cost, final state only** (Lorenz only; *not a user job*: the README's old ensemble row):
  ``pydso.backends.jax.fixed_step_ensemble(lorenz, x0, theta, ..., save_every=steps)`` jitted;
* **memory-traffic bound** of "every state saved": bytes the rollout writes per trajectory-step (states ``8 d``,
  step cost 8, log-density 8, alive flag 1) over the write bandwidth measured here in the same run — ``np.copyto``
  into a warm buffer, and filling a freshly allocated one (page faults included: what a new output array costs);
  the row reports the fraction of that bound reached;
* **score gradient**: ``pydso.score_gradient`` on the problem's Gaussian-noise twin (``GaussianChain`` with the
  same mean step and scale ``NOISE``), because both problems are deterministic and have no transition density
  (``score_gradient`` on them raises ``ProblemError``). diffrax has no peer: "-".

Problems (fp64, one JAX device, the same initial states for both contenders: the rollout's own, read from the
first ``pydso.rollout`` call's ``states[:, 0]``; pydso's first calls are made before any diffrax code runs):

* **Lorenz** (sigma=10, rho=28, beta=8/3) with the running cost ``L = x @ x``, ``--lorenz-steps`` (1000) RK4 (3/8)
  steps of dt = 0.01, N = ``--lorenz-n`` (1e4); diffrax integrates ``(x, J)`` with the same tableau and step.
* **Pendulum demo** (``examples/pendulum_swingup.py``): gymnasium's Pendulum-v1 closed by the demo's 2x64 tanh MLP
  (``pydso.problems.control.pendulum``'s initial policy, key 0), the demo's training problem (discount 0.93, starts
  ``th ~ U[-pi, pi]``, ``thdot ~ U[-3, 3]``), at the demo's batch 64 x 50 and at 4096 x 200. The plant is a discrete
  map, so diffrax runs it as ``Euler`` with ``dt0 = 1`` on the field ``(f(x) - x, gamma^t c(x))``: the same
  sequence of states (to rounding) and the same discounted cost sum.

Usage: python benchmarks/bench_user_jobs.py [--rounds 3] [--lorenz-steps 1000] [--lorenz-n 10000] [--quick]
[--cpu-devices N] [--compare-devices 2]. ``--compare-devices 2`` then runs the same benchmark again in a fresh
process with ``PYDSO_CPU_DEVICES=2`` and reports, per row and job, the speed-up over one device.
Writes benchmarks/results/user_jobs.json (machine, versions, load average before/after, every number).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# --cpu-devices N must take effect before JAX creates its CPU backend (see pydso._config).
if "--cpu-devices" in sys.argv:
    os.environ["PYDSO_CPU_DEVICES"] = sys.argv[sys.argv.index("--cpu-devices") + 1]

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import pydso  # enables fp64
from pydso.backends.jax import RK4ThreeEighths
from pydso.problems import control

sys.path.insert(0, str(Path(__file__).parent))
from bench_ensemble_ode import DT, THETA, interleaved, lorenz, machine_info, running_cost  # noqa: E402

NOISE = 0.01
PENDULUM_GAMMA = 0.93
PENDULUM_LOW, PENDULUM_HIGH = (-np.pi, -3.0), (np.pi, 3.0)


# ------------------------------------------------------------------------------------------- problems
def lorenz_problem(steps):
    return pydso.Problem(
        pydso.ODESystem(lorenz, dt=DT, solver=RK4ThreeEighths()),
        running_cost,
        pydso.FiniteHorizon(steps),
        pydso.Normal(jnp.array([1.0, 1.0, 20.0]), 1.0),
    )


def rk38_step(x, th):
    """One RK4 (3/8) step of Lorenz: the mean of the Lorenz score-gradient twin."""
    k1 = lorenz(0.0, x, th)
    k2 = lorenz(0.0, x + DT * k1 / 3, th)
    k3 = lorenz(0.0, x + DT * (k2 - k1 / 3), th)
    k4 = lorenz(0.0, x + DT * (k1 - k2 + k3), th)
    return x + DT * (k1 + 3 * k2 + 3 * k3 + k4) / 8


def lorenz_noisy(steps):
    return pydso.Problem(
        pydso.GaussianChain(rk38_step, NOISE),
        running_cost,
        pydso.FiniteHorizon(steps),
        pydso.Normal(jnp.array([1.0, 1.0, 20.0]), 1.0),
    )


def pendulum_problems(horizon):
    task = control.pendulum(key=jax.random.key(0))
    problem = control.pendulum_problem(
        task.static, gamma=PENDULUM_GAMMA, horizon=horizon, low=PENDULUM_LOW, high=PENDULUM_HIGH
    )
    noisy = pydso.Problem(
        pydso.GaussianChain(problem.system.step_fn, NOISE), problem.cost, problem.setting, problem.initial
    )
    return problem, noisy, task.theta0


# ------------------------------------------------------------------------------------------- diffrax peers
def diffrax_lorenz(steps, save_all):
    """vmap of diffeqsolve on ``(x, J)``, RK4 (3/8); returns J (and the states when ``save_all``)."""
    saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, DT * steps, steps + 1)) if save_all else diffrax.SaveAt(t1=True)

    def one(x0, th):
        def field(t, y, th):
            return lorenz(t, y[0], th), running_cost(y[0], th)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            RK4ThreeEighths(),
            t0=0.0,
            t1=DT * steps,
            dt0=DT,
            y0=(x0, jnp.zeros((), x0.dtype)),
            args=th,
            saveat=saveat,
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=steps + 8,
        )
        return (sol.ys[1][-1], sol.ys[0]) if save_all else sol.ys[1][-1]

    return jax.vmap(one, in_axes=(0, None))


def diffrax_pendulum(problem, horizon, save_all):
    """The discrete closed loop as diffrax ``Euler`` with ``dt0 = 1``: ``x += f(x) - x``, ``J += gamma^t c(x)``."""
    step, cost = problem.system.step_fn, problem.cost
    saveat = diffrax.SaveAt(ts=jnp.arange(horizon + 1.0)) if save_all else diffrax.SaveAt(t1=True)

    def one(x0, th):
        def field(t, y, th):
            x = y[0]
            return step(x, th) - x, PENDULUM_GAMMA**t * cost(x, th)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Euler(),
            t0=0.0,
            t1=float(horizon),
            dt0=1.0,
            y0=(x0, jnp.zeros((), x0.dtype)),
            args=th,
            saveat=saveat,
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=horizon + 8,
        )
        return (sol.ys[1][-1], sol.ys[0]) if save_all else sol.ys[1][-1]

    return jax.vmap(one, in_axes=(0, None))


# ------------------------------------------------------------------------------------------- one problem
def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def measure(name, problem, noisy, theta, n, steps, dfx_obj, dfx_all, rounds, kernel=None, forward=False):
    key = jax.random.key(0)
    objective_jit = jax.jit(lambda th, k: pydso.rollout(problem, th, key=k, n=n, check=False).objective)
    contenders = {
        "objective": lambda: pydso.rollout(problem, theta, key=key, n=n, save="costs").objective,
        "objective_jit": lambda: objective_jit(theta, key),
        "rollout_saved": lambda: pydso.rollout(problem, theta, key=key, n=n),
        "pathwise_gradient": lambda: pydso.pathwise_gradient(problem, theta, key=key, n=n),
        "score_gradient": lambda: pydso.score_gradient(noisy, theta, key=key, n=n),
    }
    first, outs = {}, {}

    def first_calls():  # tracing and compilation included
        for c, fn in contenders.items():
            if c not in first:
                t = time.perf_counter()
                outs[c] = jax.block_until_ready(fn())
                first[c] = time.perf_counter() - t

    first_calls()
    x0 = outs["rollout_saved"].states[:, 0]  # the rollout's own initial states
    if kernel is not None:
        contenders["kernel_nocost_final_state"] = lambda: kernel(x0, theta)
    if forward:  # forward mode: few parameters only
        fwd = pydso.Pathwise(mode="forward")
        contenders["pathwise_forward_mode"] = lambda: fwd.estimate(problem, theta, key=key, n=n)
    dfx_o, dfx_a = jax.jit(dfx_obj), jax.jit(dfx_all)
    dfx_g = jax.jit(jax.grad(lambda th, x0: jnp.mean(dfx_obj(x0, th))))
    contenders |= {
        "diffrax_objective": lambda: dfx_o(x0, theta),
        "diffrax_saved": lambda: dfx_a(x0, theta),
        "diffrax_gradient": lambda: dfx_g(theta, x0),
    }
    first_calls()
    best = interleaved(contenders, rounds)
    g_pydso, g_dfx = flat(outs["pathwise_gradient"].gradient), flat(outs["diffrax_gradient"])
    row = {
        "problem": name,
        "N": n,
        "steps": steps,
        "rounds": rounds,
        "seconds_best": {c: v[0] for c, v in best.items()},
        "seconds_worst": {c: v[1] for c, v in best.items()},
        "first_call_s": first,
        "compile_s": {c: max(first[c] - best[c][0], 0.0) for c in contenders},
        "steps_per_s": {c: n * steps / best[c][0] for c in contenders},
        "pydso_over_diffrax_speed": {
            "objective": best["diffrax_objective"][0] / best["objective"][0],
            "objective_jit": best["diffrax_objective"][0] / best["objective_jit"][0],
            "rollout_saved": best["diffrax_saved"][0] / best["rollout_saved"][0],
            "pathwise_gradient": best["diffrax_gradient"][0] / best["pathwise_gradient"][0],
            "forward": (
                best["diffrax_gradient"][0] / best["pathwise_forward_mode"][0]
                if "pathwise_forward_mode" in best
                else None
            ),
        },
        "grad_over_forward_time": {
            "pydso": best["pathwise_gradient"][0] / best["objective"][0],
            "diffrax": best["diffrax_gradient"][0] / best["diffrax_objective"][0],
            "pydso_score": best["score_gradient"][0] / best["objective"][0],
            "pydso_forward_mode": (
                best["pathwise_forward_mode"][0] / best["objective"][0] if "pathwise_forward_mode" in best else None
            ),
        },
        "agreement": {
            "objective_max_rel_diff": rel(outs["objective"], outs["diffrax_objective"]),
            "saved_states_max_rel_diff": rel(outs["rollout_saved"].states, outs["diffrax_saved"][1]),
            "gradient_max_rel_diff": rel(g_pydso, g_dfx),
        },
        "n_params": int(g_pydso.size),
        "bytes_written_per_step_saved": 8 * int(x0.shape[-1]) + 17,
    }
    print(json.dumps(row), flush=True)
    return row


def fmt_row(r):
    s, c, x = r["steps_per_s"], r["compile_s"], r["pydso_over_diffrax_speed"]
    lines = []
    for job, ours, peer, key in (
        ("objective only, rollout(save='costs')", "objective", "diffrax_objective", "objective"),
        ("objective only, inside the user's jit", "objective_jit", "diffrax_objective", "objective_jit"),
        ("every state saved", "rollout_saved", "diffrax_saved", "rollout_saved"),
        ("pathwise gradient", "pathwise_gradient", "diffrax_gradient", "pathwise_gradient"),
        ("pathwise gradient, Pathwise(mode='forward')", "pathwise_forward_mode", "diffrax_gradient", "forward"),
        ("score gradient (noisy twin)", "score_gradient", None, None),
        ("kernel, no cost, final state only (not a user job)", "kernel_nocost_final_state", None, None),
    ):
        if ours not in s:
            continue
        dfx = f"{s[peer]:.3g} | {c[peer]:.2f}" if peer else "– | –"
        ratio = f"{x[key]:.2f}" if key else "–"
        lines.append(
            f"| {r['problem']} {r['N']} x {r['steps']} | {job} | {s[ours]:.3g} | {c[ours]:.2f} | {dfx} | {ratio} |"
        )
    return lines


def write_bandwidth(n_bytes=320_000_000, reps=5):
    """Bytes/s written by ``np.copyto`` into a warm buffer, and by filling a freshly allocated buffer (page faults
    included), best of ``reps``."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    dst.fill(0.0)
    warm, fresh = [], []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        new = np.empty_like(src)
        new.fill(1.0)
        fresh.append(time.perf_counter() - t)
        del new
    return {"copy_warm": n_bytes / min(warm), "fill_fresh": n_bytes / min(fresh)}


def memory_bound(row, bandwidth):
    """Steps/s of 'every state saved' if only writing its outputs counted, and the fraction reached."""
    b = row["bytes_written_per_step_saved"]
    achieved = row["steps_per_s"]["rollout_saved"]
    return {
        kind: {"bound_steps_per_s": bw / b, "fraction_reached": achieved / (bw / b)} for kind, bw in bandwidth.items()
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lorenz-steps", type=int, default=1000)
    ap.add_argument("--lorenz-n", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="Lorenz 1000 x 200, pendulum 64 x 50 only, 2 rounds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "user_jobs.json"))
    ap.add_argument("--cpu-devices", type=int, default=None, help="PYDSO_CPU_DEVICES for this run")
    ap.add_argument("--compare-devices", type=int, default=None, help="also run with this many CPU devices")
    args = ap.parse_args()
    pendulum_sizes = [(64, 50), (4096, 200)]
    if args.quick:
        args.rounds, args.lorenz_steps, args.lorenz_n, pendulum_sizes = 2, 200, 1000, [(64, 50)]

    info = machine_info()
    t_start = time.perf_counter()
    rows = []
    steps = args.lorenz_steps
    rows.append(
        measure(
            "Lorenz",
            lorenz_problem(steps),
            lorenz_noisy(steps),
            THETA,
            args.lorenz_n,
            steps,
            diffrax_lorenz(steps, False),
            diffrax_lorenz(steps, True),
            args.rounds,
            kernel=jax.jit(
                lambda x0, th: pydso.backends.jax.fixed_step_ensemble(
                    lorenz, x0, th, dt=DT, n_steps=steps, solver=RK4ThreeEighths(), save_every=steps
                )[0]
            ),
            forward=True,
        )
    )
    for n, horizon in pendulum_sizes:
        problem, noisy, theta = pendulum_problems(horizon)
        rows.append(
            measure(
                "Pendulum MLP",
                problem,
                noisy,
                theta,
                n,
                horizon,
                diffrax_pendulum(problem, horizon, False),
                diffrax_pendulum(problem, horizon, True),
                args.rounds,
            )
        )
    bandwidth = write_bandwidth()
    for r in rows:
        r["memory_bound"] = memory_bound(r, bandwidth)
    result = {
        "benchmark": "user jobs through the public API vs jax.vmap(diffrax.diffeqsolve), same job, fp64",
        "jax_devices": len(jax.devices()),
        "write_bandwidth_bytes_per_s": bandwidth,
        "notes": {
            "timing": "best (and worst) of interleaved rounds; compile_s = first call - best call",
            "objective": "pydso.rollout(..., save='costs').objective, eager, finiteness check included",
            "objective_jit": "jit(lambda: rollout(..., check=False).objective): the same inside the user's jit",
            "kernel_nocost_final_state": "fixed_step_ensemble without a cost, final state only: not a user job",
            "memory_bound": "bytes written per trajectory-step by 'every state saved' over the write bandwidth "
            "measured in this run (warm np.copyto; fill of a fresh buffer, page faults included)",
            "rollout_saved": "pydso.rollout end to end (check=True): every state and step cost saved",
            "score_gradient": f"on the GaussianChain twin (same mean step, scale {NOISE}); no diffrax peer",
            "lorenz": "L = x @ x integrated with the RK4 (3/8) tableau, dt = 0.01; diffrax: (x, J) augmented",
            "pendulum": "examples/pendulum_swingup.py's training problem (gamma 0.93, thdot ~ U[-3, 3]), initial "
            "MLP of control.pendulum(key=key(0)); diffrax: Euler dt0 = 1 on (f(x) - x, gamma^t c(x))",
        },
        "machine": info | {"loadavg_at_end": os.getloadavg(), "pydso": pydso.__version__},
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }
    if args.compare_devices:
        result["devices_compare"] = compare_devices(args, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nload average {info['loadavg_at_start']} -> {os.getloadavg()}; wall {result['wall_s']:.0f} s")
    print("\n| problem N x steps | job | pydso steps/s | compile s | diffrax steps/s | compile s | pydso / diffrax |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("\n".join(fmt_row(r)))
    print("\n| problem | pathwise grad / objective (pydso) | forward mode | (diffrax) | score grad / objective |")
    print("|---|---|---|---|---|")
    for r in rows:
        g = r["grad_over_forward_time"]
        label = f"{r['problem']} {r['N']} x {r['steps']}"
        fm = f"{g['pydso_forward_mode']:.2f}" if g["pydso_forward_mode"] else "–"
        print(f"| {label} | {g['pydso']:.2f} | {fm} | {g['diffrax']:.2f} | {g['pydso_score']:.2f} |")
    print(
        "\n| problem | every state saved, steps/s | bytes/step | bound (warm copy) | fraction | bound (fresh) "
        "| fraction |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m, label = r["memory_bound"], f"{r['problem']} {r['N']} x {r['steps']}"
        print(
            f"| {label} | {r['steps_per_s']['rollout_saved']:.3g} | {r['bytes_written_per_step_saved']} | "
            f"{m['copy_warm']['bound_steps_per_s']:.3g} | {m['copy_warm']['fraction_reached']:.0%} | "
            f"{m['fill_fresh']['bound_steps_per_s']:.3g} | {m['fill_fresh']['fraction_reached']:.0%} |"
        )
    if "devices_compare" in result:
        d = result["devices_compare"]
        jobs = ["objective", "objective_jit", "rollout_saved", "pathwise_gradient", "score_gradient"]
        print(f"\n| problem | speed-up with {d['devices']} CPU devices: " + " | ".join(jobs) + " |")
        print("|---|" + "---|" * len(jobs))
        for label, sp in d["speedup"].items():
            print(f"| {label} | " + " | ".join(f"{sp[j]:.2f}x" for j in jobs) + " |")


def compare_devices(args, rows):
    """Run this benchmark again with ``--cpu-devices k`` in a fresh process; speed-up per row and job."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "devices.json"
        cmd = [sys.executable, __file__, "--cpu-devices", str(args.compare_devices), "--out", str(out)]
        cmd += ["--rounds", str(args.rounds), "--lorenz-steps", str(args.lorenz_steps)]
        cmd += ["--lorenz-n", str(args.lorenz_n)] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, check=True)
        other = json.loads(out.read_text())
    speedup = {}
    for a, b in zip(rows, other["rows"], strict=True):
        label = f"{a['problem']} {a['N']} x {a['steps']}"
        speedup[label] = {j: a["seconds_best"][j] / b["seconds_best"][j] for j in a["seconds_best"]}
    return {
        "devices": args.compare_devices,
        "jax_devices_seen": other["jax_devices"],
        "speedup": speedup,
        "rows": other["rows"],
    }


if __name__ == "__main__":
    main()
