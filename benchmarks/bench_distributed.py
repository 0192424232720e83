"""Distributed estimates over a Dask LocalCluster of 2 worker processes vs one process, same job, same key.

Problem: a linear-Gaussian closed loop (4 states, 1 input, u = -K x, Gaussian noise 0.1, quadratic cost, discount
0.99, horizon H = 200 steps), fp64; N episodes per estimate (default 2**15). Rows, each through the public API:

| job | one process | distributed (2 worker processes, threads_per_worker=1) |
|---|---|---|
| objective | `pydso.rollout(...).objective` mean and stderr | `pydso.distributed_objective(...)` |
| score gradient (MeanBaseline) | `pydso.Score().estimate(...)` | `pydso.distributed_estimate(pydso.Score(), ...)` |
| score gradient (NoBaseline) | `Score(NoBaseline()).estimate` | `distributed_estimate(Score(NoBaseline()), ...)` |
| pathwise gradient (32 groups) | `Pathwise(groups=32).estimate` | `distributed_estimate(Pathwise(groups=32), ...)` |

Times are warm (after one call that compiles: the cluster is started once and kept, as a user with a long-running
client would) and interleaved over ``--rounds`` rounds; the minimum is reported beside the maximum since other
jobs may share the machine, and the first (cold) call of each separately. The distributed result is compared with
the single-process one (maximum relative difference). XLA's CPU backend runs one compiled ensemble on one core,
so 2 worker processes can at most double the rate; the load average before and after is recorded.

The MeanBaseline row needs two passes (batch-wide sums first), so each chunk's episodes are materialised between
them; the NoBaseline row is one compiled pass per chunk.

Usage: python benchmarks/bench_distributed.py [--n 32768] [--horizon 200] [--rounds 3] [--chunks K]
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pydso

D = 4
A = jnp.eye(D) + 0.05 * jnp.diag(jnp.ones(D - 1), 1) - 0.02 * jnp.eye(D)
B = jnp.zeros((D, 1)).at[-1, 0].set(0.1)


def mean(x, K):
    return A @ x - B @ (K @ x)


def cost(x, K):
    u = K @ x
    return x @ x + 0.1 * (u @ u)


def make_problem(horizon):
    return pydso.Problem(
        pydso.GaussianChain(mean, 0.1), cost, pydso.Episodic(0.99, horizon), pydso.Normal(jnp.zeros(D), 1.0)
    )


def rel_diff(a, b):
    a, b = (np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2**15)
    ap.add_argument("--horizon", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=None, help="chunks (tasks) per job (default: one per worker)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.json"))
    args = ap.parse_args()

    from dask.distributed import Client, LocalCluster

    load_before = os.getloadavg()
    problem, theta, key, n = make_problem(args.horizon), 0.3 * jnp.ones((1, D)), jax.random.key(0), args.n
    chunk = pathwise_chunk = None
    if args.chunks is not None:  # equal chunks; Pathwise's chunks hold whole batch-means groups
        backend = pydso.backends.get_backend("jax")
        m = -(-n // 32)
        G = -(-n // m)
        m = backend.group_size(problem, m, G)
        chunk, pathwise_chunk = n // args.chunks, (G // args.chunks) * m
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    cluster_start_s = time.perf_counter() - t0

    def one_objective():
        v = pydso.rollout(problem, theta, key=key, n=n).objective
        return float(jnp.mean(v)), float(jnp.std(v, ddof=1) / jnp.sqrt(n))

    jobs = {
        "objective": (
            one_objective,
            lambda: pydso.distributed_objective(problem, theta, key=key, n=n, client=client, chunk_size=chunk),
        ),
        "score_gradient": (
            lambda: pydso.Score().estimate(problem, theta, key=key, n=n),
            lambda: pydso.distributed_estimate(
                pydso.Score(), problem, theta, key=key, n=n, client=client, chunk_size=chunk
            ),
        ),
        "score_gradient_no_baseline": (
            lambda: pydso.Score(pydso.NoBaseline()).estimate(problem, theta, key=key, n=n),
            lambda: pydso.distributed_estimate(
                pydso.Score(pydso.NoBaseline()), problem, theta, key=key, n=n, client=client, chunk_size=chunk
            ),
        ),
        "pathwise_gradient": (
            lambda: pydso.Pathwise(groups=32).estimate(problem, theta, key=key, n=n),
            lambda: pydso.distributed_estimate(
                pydso.Pathwise(groups=32), problem, theta, key=key, n=n, client=client, chunk_size=pathwise_chunk
            ),
        ),
    }

    def timed(f):
        t = time.perf_counter()
        out = jax.block_until_ready(f())
        return time.perf_counter() - t, out

    rows = []
    for name, (single, dist) in jobs.items():
        cold_single, ref = timed(single)
        cold_dist, got = timed(dist)
        ts, td = [], []
        for _ in range(args.rounds):
            ts.append(timed(single)[0])
            td.append(timed(dist)[0])
        steps = n * args.horizon
        row = {
            "job": name,
            "n": n,
            "horizon": args.horizon,
            "one_process_s": min(ts),
            "one_process_max_s": max(ts),
            "distributed_s": min(td),
            "distributed_max_s": max(td),
            "speedup": min(ts) / min(td),
            "one_process_steps_per_s": steps / min(ts),
            "distributed_steps_per_s": steps / min(td),
            "first_call_one_process_s": cold_single,
            "first_call_distributed_s": cold_dist,
            "max_rel_diff_vs_one_process": rel_diff(got, ref),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    client.close()
    cluster.close()
    result = {
        "benchmark": "bench_distributed",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"jax": jax.__version__, "pydso": pydso.__version__, "dask": __import__("dask").__version__},
        "workers": args.workers,
        "chunks": args.chunks or f"default (one per worker: {args.workers})",
        "threads_per_worker": 1,
        "cluster_start_s": cluster_start_s,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "warm times (compiled; cluster kept), min over interleaved rounds; other jobs shared the machine "
        "when loadavg exceeds the core count, so speed-ups are then lower bounds of what an idle machine gives",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| job | one process | 2 worker processes | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['job']} | {r['one_process_s']:.2f} s | {r['distributed_s']:.2f} s | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
