"""pydso (pathwise DSO) vs Stable-Baselines3 PPO on gymnasium's Pendulum-v1: time and env steps to return >= -200.

Both learners are checked the same way: mean undiscounted return over 100 episodes of gymnasium's own
``Pendulum-v1`` (seeded resets, deterministic policy) >= -200. Training wall time excludes evaluation time
(both are reported), and includes compilation / start-up. Environment steps:

* pydso: episodes x horizon simulated per optimisation step (the model is known; no gymnasium calls in training).
  Evaluated every ``--dso-every`` steps: first screened by pydso's exact simulation of the same 100 gymnasium
  starts (identical to gymnasium to 1e-6, see tests/test_pendulum_gym.py), then confirmed in gymnasium itself.
* PPO: rl-zoo3's tuned hyperparameters for Pendulum-v1 (rl_zoo3 2.9.2, ``hyperparams/ppo.yml``: n_envs 4,
  n_timesteps 1e5, MlpPolicy, n_steps 1024, gae_lambda 0.95, gamma 0.9, n_epochs 10, ent_coef 0.0,
  learning_rate 1e-3, clip_range 0.2, use_sde True, sde_sample_freq 4), evaluated every ``--ppo-every`` env steps.

pydso runs twice, each time in a fresh Python process: **cold** with an empty persistent compilation cache
(``PYDSO_CACHE_DIR`` pointed at a new temporary folder; inherited cache settings are dropped), then **warm** with the
cache the cold run filled. ``compile_s`` is what JAX itself reports (``jax.monitoring`` compile events: Python tracing,
lowering to MLIR, XLA compilation or the cache lookup) during training, evaluation excluded; ``first_step_s`` and
``step_ms`` split the training time into the first optimisation step (start-up, compilation) and the later ones.

Results: ``benchmarks/results/dso_vs_ppo.json`` (cold, with PPO), ``benchmarks/results/dso_vs_ppo_warm_cache.json``
(warm, the same PPO run) and a markdown table. Run (PPO needs torch and Stable-Baselines3):
``python benchmarks/bench_dso_vs_ppo.py``.
"""

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
THRESHOLD = -200.0
EVAL_EPISODES = 100
EVAL_SEED = 2024
PPO_ZOO = dict(
    n_envs=4,
    n_timesteps=int(1e5),
    policy="MlpPolicy",
    n_steps=1024,
    gae_lambda=0.95,
    gamma=0.9,
    n_epochs=10,
    ent_coef=0.0,
    learning_rate=1e-3,
    clip_range=0.2,
    use_sde=True,
    sde_sample_freq=4,
)


def load_example():
    spec = importlib.util.spec_from_file_location("pendulum_swingup", ROOT / "examples" / "pendulum_swingup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gym_starts(n=EVAL_EPISODES, seed=EVAL_SEED):
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    starts = []
    for i in range(n):
        env.reset(seed=seed + i)
        starts.append(np.array(env.unwrapped.state, dtype=np.float64))
    return np.asarray(starts)


def gym_evaluate(act, n=EVAL_EPISODES, seed=EVAL_SEED):
    """Mean return over ``n`` seeded episodes of gymnasium's Pendulum-v1 with ``act(obs) -> torque``."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    returns = []
    for i in range(n):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(np.array([act(obs)], dtype=np.float64))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return np.asarray(returns)


class CompileClock:
    """Sums JAX's own compile-time events (``jax.monitoring``): Python tracing to a jaxpr, lowering to MLIR, XLA
    compilation (or, warm, the persistent-cache lookup), per function, while ``counting`` is on."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "xla_s",
    }

    def __init__(self):
        import jax

        self.counting = True
        self.total = {name: 0.0 for name in self.EVENTS.values()}
        self.per_function = {}
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        name = self.EVENTS.get(event)
        if name is None or not self.counting:
            return
        self.total[name] += duration
        fun = str(kwargs.get("fun_name", "?"))
        if fun.startswith("jit(") and fun.endswith(")"):  # lowering and XLA events name "jit(f)", tracing "f"
            fun = fun[4:-1]
        entry = self.per_function.setdefault(fun, {"trace_s": 0.0, "lower_s": 0.0, "xla_s": 0.0, "xla_calls": 0})
        entry[name] += duration
        entry["xla_calls"] += name == "xla_s"

    def report(self):
        top = sorted(self.per_function.items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k != "xla_calls"))
        return dict(
            compile_s=sum(self.total.values()),
            **self.total,
            xla_compilations=sum(v["xla_calls"] for v in self.per_function.values()),
            per_function={k: {n: round(x, 4) for n, x in v.items()} for k, v in top},
        )


def run_pydso(max_steps, every, seed):
    """Train with the demo's ``train()`` (its defaults), evaluating every ``every`` steps; in a fresh process.

    ``compile_s`` sums JAX's compile events during training (tracing + lowering + XLA, evaluation excluded);
    ``first_step_s`` is the time from the start to the end of the first optimisation step, ``step_ms`` the median
    time of the later steps (evaluation excluded)."""
    import equinox as eqx
    import jax

    clock = CompileClock()
    ex = load_example()
    starts = gym_starts()
    n, horizon = ex.DEFAULTS["n"], ex.DEFAULTS["horizon"]
    state = dict(eval_s=0.0, eval_cpu_s=0.0, reached=None, curve=[], step_ends=[])
    # The callback needs the policy's static part before train() returns; it is made inside the first evaluation
    # (whose time is excluded), so nothing is compiled before the clock starts: train() initialises its own policy.
    static_holder = {}

    def callback(info):
        state["step_ends"].append(time.perf_counter() - state["eval_s"])
        if (info.step + 1) % every:
            return False
        clock.counting = False
        t, c = time.perf_counter(), time.process_time()
        if "static" not in static_holder:
            static_holder["static"] = eqx.partition(ex.init_policy(seed), eqx.is_array)[1]
        model = eqx.combine(info.theta, static_holder["static"])
        screen = float(ex.returns_from(model, starts).mean())
        confirmed = None
        if screen >= THRESHOLD:
            theta, static_part = eqx.partition(model, eqx.is_array)
            f = jax.jit(lambda th, obs: eqx.combine(th, static_part).act(obs))
            confirmed = float(gym_evaluate(lambda obs: float(f(theta, obs))).mean())
        state["eval_s"] += time.perf_counter() - t
        state["eval_cpu_s"] += time.process_time() - c
        clock.counting = True
        elapsed = time.perf_counter() - state["t0"] - state["eval_s"]
        cpu = time.process_time() - state["c0"] - state["eval_cpu_s"]
        steps = info.step + 1
        point = dict(step=steps, env_steps=steps * n * horizon, train_s=elapsed, train_cpu_s=cpu)
        state["curve"].append(dict(point, pydso_return=screen, gym_return=confirmed))
        print(
            f"  pydso step {steps:4d}: env steps {steps * n * horizon:7d}, train {elapsed:6.2f} s, "
            f"return {screen:8.1f} (pydso) {'' if confirmed is None else f'{confirmed:8.1f} (gymnasium)'}",
            flush=True,
        )
        if confirmed is not None and confirmed >= THRESHOLD:
            state["reached"] = dict(point, gym_return=confirmed, **clock.report())
            return True
        return False

    state["t0"], state["c0"] = time.perf_counter(), time.process_time()
    max_steps = max_steps or ex.DEFAULTS["steps"]
    _, result, info = ex.train(steps=max_steps, seed=seed, progress=False, callback=callback)
    total = time.perf_counter() - state["t0"]
    ends = np.asarray(state["step_ends"]) - state["t0"]
    return dict(
        reached=state["reached"],
        curve=state["curve"],
        total_wall_s=total,
        eval_s=state["eval_s"],
        first_step_s=float(ends[0]),
        step_ms=float(np.median(np.diff(ends)) * 1e3) if len(ends) > 1 else None,
        compile=clock.report(),
        cpu_note="train_cpu_s: this process's CPU time (all threads) minus evaluation (robust to a shared machine)",
        settings=info["settings"],
        env_steps_per_opt_step=n * horizon,
    )


def run_pydso_fresh(args, cache_dir):
    """``run_pydso`` in a fresh Python process whose persistent compilation cache is ``cache_dir`` (and nothing
    else: inherited ``PYDSO_CACHE_DIR`` / ``JAX_COMPILATION_CACHE_DIR`` are replaced)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYDSO_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")}
    env["PYDSO_CACHE_DIR"] = cache_dir
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pydso.json")
        cmd = [
            sys.executable,
            __file__,
            "--pydso-child",
            out,
            "--seed",
            str(args.seed),
            "--dso-every",
            str(args.dso_every),
        ]
        if args.dso_steps:
            cmd += ["--dso-steps", str(args.dso_steps)]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def run_ppo(every, seed, max_wall, threads):
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    if threads:
        torch.set_num_threads(threads)
    hp = dict(PPO_ZOO)
    n_envs, n_timesteps, policy = hp.pop("n_envs"), hp.pop("n_timesteps"), hp.pop("policy")
    state = dict(eval_s=0.0, eval_cpu_s=0.0, reached=None, curve=[], next_eval=every, stopped=None)

    class Check(BaseCallback):
        def _on_step(self):
            if self.num_timesteps < state["next_eval"]:
                return True
            state["next_eval"] += every
            t, c = time.perf_counter(), time.process_time()
            returns = gym_evaluate(lambda obs: float(self.model.predict(obs, deterministic=True)[0][0]))
            state["eval_s"] += time.perf_counter() - t
            state["eval_cpu_s"] += time.process_time() - c
            elapsed = time.perf_counter() - state["t0"] - state["eval_s"]
            cpu = time.process_time() - state["c0"] - state["eval_cpu_s"]
            mean = float(returns.mean())
            state["curve"].append(
                dict(env_steps=int(self.num_timesteps), train_s=elapsed, train_cpu_s=cpu, gym_return=mean)
            )
            print(
                f"  PPO env steps {self.num_timesteps:7d}: train {elapsed:6.2f} s, return {mean:8.1f} (gymnasium)",
                flush=True,
            )
            if mean >= THRESHOLD:
                state["reached"] = dict(
                    env_steps=int(self.num_timesteps), train_s=elapsed, train_cpu_s=cpu, gym_return=mean
                )
                return False
            if elapsed > max_wall:
                state["stopped"] = f"stopped after {elapsed:.0f} s of training (cap --ppo-max-wall {max_wall:g} s)"
                print("  " + state["stopped"], flush=True)
                return False
            return True

    state["t0"], state["c0"] = time.perf_counter(), time.process_time()
    env = make_vec_env("Pendulum-v1", n_envs=n_envs, seed=seed)
    model = PPO(policy, env, seed=seed, verbose=0, device="cpu", **hp)
    model.learn(total_timesteps=n_timesteps, callback=Check())
    total = time.perf_counter() - state["t0"]
    return dict(
        reached=state["reached"],
        curve=state["curve"],
        total_wall_s=total,
        eval_s=state["eval_s"],
        hyperparameters=PPO_ZOO,
        torch_threads=torch.get_num_threads(),
    )


def versions():
    out = {}
    for name in ("jax", "jaxlib", "equinox", "optax", "gymnasium", "numpy", "torch", "stable_baselines3", "pydso"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[name] = None
    return out


def machine():
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return dict(
        platform=platform.platform(),
        python=platform.python_version(),
        cpu=model,
        cores=os.cpu_count(),
        load_avg=os.getloadavg(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dso-steps", type=int, default=None, help="pydso optimisation steps (default: the demo's)")
    parser.add_argument("--dso-every", type=int, default=10, help="pydso evaluation period (optimisation steps)")
    parser.add_argument("--ppo-every", type=int, default=5000, help="PPO evaluation period (env steps)")
    parser.add_argument("--ppo-max-wall", type=float, default=420.0, help="stop PPO after this much training (s)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads for PPO (0: torch default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dso_vs_ppo.json"))
    parser.add_argument(
        "--warm-out",
        default=str(ROOT / "benchmarks" / "results" / "dso_vs_ppo_warm_cache.json"),
        help="where the warm-cache row goes ('' to skip it)",
    )
    parser.add_argument("--pydso-child", default=None, help=argparse.SUPPRESS)  # internal: one fresh pydso run
    args = parser.parse_args(argv)

    if args.pydso_child:
        with open(args.pydso_child, "w") as f:
            json.dump(run_pydso(args.dso_steps, args.dso_every, args.seed), f)
        return

    with tempfile.TemporaryDirectory(prefix="pydso-bench-cache-") as cache:
        print("pydso (pathwise), cold: fresh process, empty compilation cache ...", flush=True)
        cold = run_pydso_fresh(args, cache)
        warm = None
        if args.warm_out:
            print("pydso (pathwise), warm: fresh process, the cache the cold run filled ...", flush=True)
            warm = run_pydso_fresh(args, cache)
    try:
        import stable_baselines3  # noqa: F401
        import torch  # noqa: F401

        sb3_error = None
    except ImportError as e:
        sb3_error = f"Stable-Baselines3/torch not installed ({e}); recording pydso only"
        print(sb3_error)
    ppo = None
    if sb3_error is None:
        print("SB3 PPO (rl-zoo3 hyperparameters) ...", flush=True)
        ppo = run_ppo(args.ppo_every, args.seed, args.ppo_max_wall, args.torch_threads)

    def record(dso, cache_note):
        return dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            machine=machine(),
            versions=versions(),
            threshold=THRESHOLD,
            eval_episodes=EVAL_EPISODES,
            eval_seed=EVAL_SEED,
            ppo_hyperparameters_source="rl_zoo3 2.9.2 wheel, rl_zoo3/hyperparams/ppo.yml, entry Pendulum-v1",
            pydso_compilation_cache=cache_note,
            pydso=dso,
            ppo=ppo,
            ppo_status=sb3_error or "ran",
        )

    rows = [("cold", cold, args.out, "cold: fresh process, empty persistent compilation cache (PYDSO_CACHE_DIR)")]
    if warm is not None:
        note = "warm: fresh process, PYDSO_CACHE_DIR filled by the cold run just before (same code, same machine)"
        rows.append(("warm", warm, args.warm_out, note))
    for _, dso, out, note in rows:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record(dso, note), f, indent=2)

    def cell(r, key, fmt):
        return fmt.format(r["reached"][key]) if r and r["reached"] else "not reached"

    print(
        "\n| learner | env steps to -200 | train wall s | compile s | train CPU s | return then "
        "| total wall s (incl. eval) |"
    )
    print("|---|---|---|---|---|---|---|")
    learners = [(f"pydso pathwise, {what} cache", dso) for what, dso, _, _ in rows] + [("SB3 PPO (rl-zoo3)", ppo)]
    for name, r in learners:
        if r is None:
            print(f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        print(
            f"| {name} | {cell(r, 'env_steps', '{:d}')} | {cell(r, 'train_s', '{:.2f}')} | "
            f"{cell(r, 'compile_s', '{:.2f}') if 'compile' in r else '-'} | {cell(r, 'train_cpu_s', '{:.2f}')} | "
            f"{cell(r, 'gym_return', '{:.1f}')} | {r['total_wall_s']:.1f} |"
        )
    for what, dso, _, _ in rows:
        if dso["reached"]:
            c = dso["reached"]
            print(
                f"\npydso {what}: first step done after {dso['first_step_s']:.2f} s, "
                f"later steps {dso['step_ms']:.1f} ms; "
                f"compile {c['compile_s']:.2f} s (tracing {c['trace_s']:.2f}, lowering {c['lower_s']:.2f}, "
                f"XLA {c['xla_s']:.2f}; {c['xla_compilations']} XLA compilations)"
            )
        if ppo and ppo["reached"] and dso["reached"]:
            print(
                f"PPO / pydso ({what}): wall time x{ppo['reached']['train_s'] / dso['reached']['train_s']:.2f}, "
                f"CPU time x{ppo['reached']['train_cpu_s'] / dso['reached']['train_cpu_s']:.2f}, "
                f"env steps x{ppo['reached']['env_steps'] / dso['reached']['env_steps']:.3f}"
            )
    print("\nwritten " + ", ".join(out for _, _, out, _ in rows))


if __name__ == "__main__":
    main()
