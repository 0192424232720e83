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

Results: ``benchmarks/results/dso_vs_ppo.json`` and a markdown table. Run: ``python benchmarks/bench_dso_vs_ppo.py``.
"""

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
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


def run_pydso(max_steps, every, seed):
    import equinox as eqx
    import jax

    ex = load_example()
    starts = gym_starts()
    n, horizon = ex.DEFAULTS["n"], ex.DEFAULTS["horizon"]
    state = dict(eval_s=0.0, eval_cpu_s=0.0, reached=None, curve=[])
    static_holder = {}

    def callback(info):
        if (info.step + 1) % every:
            return False
        t, c = time.perf_counter(), time.process_time()
        model = eqx.combine(info.theta, static_holder["static"])
        screen = float(ex.returns_from(model, starts).mean())
        confirmed = None
        if screen >= THRESHOLD:
            theta, static = eqx.partition(model, eqx.is_array)
            f = jax.jit(lambda th, obs: eqx.combine(th, static).act(obs))
            confirmed = float(gym_evaluate(lambda obs: float(f(theta, obs))).mean())
        state["eval_s"] += time.perf_counter() - t
        state["eval_cpu_s"] += time.process_time() - c
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
            state["reached"] = dict(point, gym_return=confirmed)
            return True
        return False

    # The static part of the policy is needed by the callback before train() returns; it depends only on the seed.
    static_holder["static"] = eqx.partition(ex.init_policy(seed), eqx.is_array)[1]
    state["t0"], state["c0"] = time.perf_counter(), time.process_time()
    max_steps = max_steps or ex.DEFAULTS["steps"]
    _, result, info = ex.train(steps=max_steps, seed=seed, progress=False, callback=callback)
    total = time.perf_counter() - state["t0"]
    return dict(
        reached=state["reached"],
        curve=state["curve"],
        total_wall_s=total,
        eval_s=state["eval_s"],
        cpu_note="train_cpu_s: this process's CPU time (all threads) minus evaluation (robust to a shared machine)",
        settings=info["settings"],
        env_steps_per_opt_step=n * horizon,
    )


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
    args = parser.parse_args(argv)

    print("pydso (pathwise) ...", flush=True)
    dso = run_pydso(args.dso_steps, args.dso_every, args.seed)
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

    record = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
        versions=versions(),
        threshold=THRESHOLD,
        eval_episodes=EVAL_EPISODES,
        eval_seed=EVAL_SEED,
        ppo_hyperparameters_source="rl_zoo3 2.9.2 wheel, rl_zoo3/hyperparams/ppo.yml, entry Pendulum-v1",
        pydso=dso,
        ppo=ppo,
        ppo_status=sb3_error or "ran",
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)

    def cell(r, key, fmt):
        return fmt.format(r["reached"][key]) if r and r["reached"] else "not reached"

    print("\n| learner | env steps to -200 | train wall s | train CPU s | return then | total wall s (incl. eval) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("pydso pathwise", dso), ("SB3 PPO (rl-zoo3)", ppo)):
        if r is None:
            print(f"| {name} | n/a | n/a | n/a | n/a | n/a |")
            continue
        print(
            f"| {name} | {cell(r, 'env_steps', '{:d}')} | {cell(r, 'train_s', '{:.2f}')} | "
            f"{cell(r, 'train_cpu_s', '{:.2f}')} | "
            f"{cell(r, 'gym_return', '{:.1f}')} | {r['total_wall_s']:.1f} |"
        )
    if ppo and ppo["reached"] and dso["reached"]:
        print(
            f"\nPPO / pydso: wall time x{ppo['reached']['train_s'] / dso['reached']['train_s']:.2f}, "
            f"CPU time x{ppo['reached']['train_cpu_s'] / dso['reached']['train_cpu_s']:.2f}, "
            f"env steps x{ppo['reached']['env_steps'] / dso['reached']['env_steps']:.3f}"
        )
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
