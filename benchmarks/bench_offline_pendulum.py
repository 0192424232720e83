"""Learning from logs: pydso vs d3rlpy (BC, CQL, IQL, TD3+BC) on the same Pendulum-v1 logs (issue 15).

**Logs.** Two logs of gymnasium's own ``Pendulum-v1`` (250 seeded episodes x 200 steps = 50,000 transitions each),
collected by running a Gaussian policy in gymnasium: the action is :math:`a = \\mathrm{clip}(\\mu_b(o) + \\sigma
\\varepsilon, -2, 2)` with :math:`\\sigma = 0.5`, and :math:`\\mu_b` the 2x64 tanh MLP of
``examples/pendulum_swingup.py``:

* *poor*: a freshly initialised MLP (seed 0);
* *medium*: the same MLP after 60 pathwise DSO steps of ``pendulum_swingup.train`` (deterministic return about -500).

The behaviour log-density of every logged action is exact: the clipped Gaussian is a *censored* Gaussian, with
density :math:`N(a; \\mu, \\sigma^2)` inside :math:`(-2, 2)` and point masses :math:`\\Phi((\\mp 2 - \\mu)/\\sigma)`
(lower/upper tail) at :math:`a = \\mp 2`. Each log is written once as a pydso store (``pydso.data.save``) and read
back from it by both libraries: d3rlpy gets an ``MDPDataset`` of the gymnasium observations, actions and rewards;
pydso gets the same episodes as a state-action chain (next paragraph).

**The pydso chain.** Pendulum-v1 is deterministic, so the only randomness in the log is the policy. pydso sees a
logged episode as a Markov chain on :math:`z = (\\vartheta, \\dot\\vartheta, a, \\text{started})`
(``pydso.problems.state_action``'s layout): a start state :math:`(x_0, 0, 0)`, then :math:`z_{t+1} = (x_t, a_t, 1)`,
:math:`x_{t+1} = f(x_t, a_t)`; the angle is recovered from the observation as ``atan2(sin, cos)`` (unwrapped along
the episode), the cost of :math:`z_{t+1}` is the gymnasium cost of step :math:`t`. The transition density is the
policy's censored Gaussian of :math:`a_{t+1}` given :math:`x_{t+1}`; the plant's factor (a point mass, the same for
every :math:`\\theta`) cancels from every importance ratio and is left out. The chain's last transition draws one
more action at the final observation (logged, never executed: it carries no cost).

**Methods.** All see only the log (no environment interaction; the plant is not given to any method):

* d3rlpy 2.8.1: ``BCConfig``, ``CQLConfig``, ``IQLConfig``, ``TD3PlusBCConfig`` with their defaults plus
  ``action_scaler=MinMaxActionScaler(minimum=-2, maximum=2)``, the same number of gradient steps each (``--steps``).
* pydso, off-policy certified: :func:`pydso.optimize.certified_improve` with :class:`pydso.Proximal` (clipped
  surrogate, ``n=0``: no fresh episodes; the log is split into 125 proposal and 125 certification episodes) on the
  chain above with discount 0.97 — model-free: importance weights of the logged episodes only. Its settings
  (Adam 1e-3, 10 epochs, 10 iterations, default ``ESSBudget``: ESS >= 25 of 250) were chosen among four on two
  *other* logs (seeds 30000 / 40000) by the certified lower bound alone, never by a gymnasium return.
* pydso, model-based: :func:`pydso.problems.model_based_improve`. (1) System identification of the pendulum from
  the logged transitions (one-step prediction loss, Levenberg-Marquardt): known structure
  :math:`\\dot\\vartheta' = \\mathrm{clip}(\\dot\\vartheta + (p_1 \\sin\\vartheta + p_2 u)\\,\\Delta t, \\pm 8)`,
  :math:`\\vartheta' = \\vartheta + \\dot\\vartheta'\\,\\Delta t` with unknown :math:`p_1 = 3g/(2l)`,
  :math:`p_2 = 3/(ml^2)` (started from the wrong guesses 10 and 1; :math:`\\Delta t = 0.05` is the log's sample time
  and the speed limit 8 is read off the data); (2) pathwise DSO of the Gaussian policy's mean on the identified chain
  with the settings of ``examples/pendulum_swingup.py`` (200 steps, 64 episodes of 50 steps, discount 0.93, starts
  with :math:`|\\dot\\vartheta| \\le 3`, Adam 1e-2 cosine-decayed, global-norm clip 1), from the behaviour's
  parameters; (3) the importance-weighted check of the result against the log (bootstrap lower bound on the
  0.93-discounted improvement, 95%). The fit's per-episode initial states are the logged ones. The check has no
  ESS floor: ``certified_above_ess_floor`` also asks for the ESS floor of ``ESSBudget()`` (25 of 250 episodes),
  since a bootstrap over a log whose weight sits on one episode (ESS ~ 1) means nothing.

**Evaluation.** Every learned policy acts deterministically (the mean action, clipped to [-2, 2]) in gymnasium's
``Pendulum-v1`` over the same 100 episodes (``reset(seed=2024 + i)``), undiscounted return, mean +- std; the
behaviour policies too (their mean action; the logs' own average return is reported beside it). Nothing is selected
by looking at these episodes: pydso returns its certified iterate / its last DSO iterate, d3rlpy its last.

**Timing.** Training wall time (and process CPU time) per method, measured in this one run, then evaluation time
separately. pydso's times are cold: they include JAX compilation. d3rlpy's exclude building the ``MDPDataset``.

Run (needs torch and d3rlpy, e.g. the ``benchmarks`` extra; see benchmarks/README.md):
``python benchmarks/bench_offline_pendulum.py [--steps 3000] [--quick]`` (about 20-30 min on 2 shared cores, CQL
most of it). torch runs with one intra-op thread (``--torch-threads``): on this shared 2-core machine torch's default
of 2 threads oversubscribed the cores and made CQL about 4x slower (< 2.5 instead of 8 steps/s). Writes
``benchmarks/results/offline_pendulum.json`` and prints a markdown table. ``--quick`` is a smoke run (small logs,
few steps) that writes nothing unless ``--out`` is given.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import log_ndtr

import pydso
from pydso import data as pdata
from pydso.optimize import ESSBudget, certified_improve
from pydso.problems import sysid
from pydso.problems.control import angle_normalize
from pydso.problems.model_based import model_based_improve
from pydso.systems import AbstractInitial

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import pendulum_swingup as ps  # noqa: E402  (the Pendulum-v1 MLP policy and its DSO training)

RESULT = ROOT / "benchmarks" / "results" / "offline_pendulum.json"
TORQUE, SPEED, DT = 2.0, 8.0, 0.05
EVAL_EPISODES, EVAL_SEED = 100, 2024
SETTINGS = dict(
    episodes=250,
    sigma=0.5,
    medium_train_steps=60,
    log_seeds=dict(poor=10_000, medium=20_000),
    policy_seeds=dict(poor=0, medium=0),
    gradient_steps=3000,
    torch_threads=1,
    certified=dict(gamma=0.97, iterations=10, epochs=10, minibatch=64, learning_rate=1e-3, clip_eps=0.2, holdout=0.5),
    model_based=dict(
        steps=200, n=64, horizon=50, gamma=0.93, lr=1e-2, final_lr_fraction=0.1, clip=1.0, train_speed=3.0,
        guess=dict(p1=10.0, p2=1.0), eval_episodes=1000,
    ),
)  # fmt: skip
QUICK = dict(SETTINGS, episodes=20, gradient_steps=50)


# ------------------------------------------------------------------------------------------- the behaviour
def censored_logp(a, mean, sigma):
    """Log-density of ``a = clip(mean + sigma * eps, -2, 2)``: Gaussian inside, tail masses at the limits."""
    inside = -0.5 * ((a - mean) / sigma) ** 2 - jnp.log(sigma) - 0.5 * jnp.log(2 * jnp.pi)
    upper = log_ndtr((mean - TORQUE) / sigma)
    lower = log_ndtr((-TORQUE - mean) / sigma)
    return jnp.where(a >= TORQUE, upper, jnp.where(a <= -TORQUE, lower, inside))


def behaviour_policies(settings, verbose=True):
    """``{"poor": model, "medium": model}``: a fresh MLP, and one after ``medium_train_steps`` DSO steps."""
    poor = ps.init_policy(settings["policy_seeds"]["poor"])
    steps, seed = settings["medium_train_steps"], settings["policy_seeds"]["medium"]
    medium, _, _ = ps.train(steps=steps, seed=seed, progress=False)
    return {"poor": poor, "medium": medium}


def collect(model, episodes, sigma, seed):
    """Run the Gaussian behaviour ``clip(model(o) + sigma eps, -2, 2)`` in gymnasium for ``episodes`` seeded episodes
    (``reset(seed=seed + i)``, actions drawn from ``numpy.random.default_rng(seed)``); returns numpy arrays
    ``obs (n, 201, 3)`` (float32 as returned), ``act (n, 201)`` (the last one drawn at the final observation, never
    executed), ``logp (n, 201)``, ``reward (n, 200)``, ``terminated``, ``truncated`` ``(n, 200)``."""
    import gymnasium as gym

    mean_fn = jax.jit(jax.vmap(lambda o: model.act(o)))
    logp_fn = jax.jit(censored_logp)
    rng = np.random.default_rng(seed)
    envs = [gym.make("Pendulum-v1") for _ in range(episodes)]
    o = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    obs, act, logp, rew, term, trunc = [o], [], [], [], [], []
    for t in range(201):
        mu = np.asarray(mean_fn(jnp.asarray(o, jnp.float64)))
        a = np.clip(mu + sigma * rng.standard_normal(episodes), -TORQUE, TORQUE)
        act.append(a)
        logp.append(np.asarray(logp_fn(jnp.asarray(a), jnp.asarray(mu), sigma)))
        if t == 200:
            break
        steps = [env.step(np.array([a[i]])) for i, env in enumerate(envs)]
        o = np.stack([s[0] for s in steps])
        obs.append(o)
        rew.append([s[1] for s in steps])
        term.append([s[2] for s in steps])
        trunc.append([s[3] for s in steps])
    tr = lambda x, dtype: np.asarray(x, dtype).T
    return dict(
        obs=np.stack(obs, axis=1), act=tr(act, np.float64), logp=tr(logp, np.float64), reward=tr(rew, np.float64),
        terminated=tr(term, bool), truncated=tr(trunc, bool),
    )  # fmt: skip


def write_store(raw, path, name, sigma):
    """The log as a pydso store in the state-action layout (module docstring), with the gymnasium observations,
    rewards, terminations and truncations kept as extra variables; returns the store opened lazily."""
    obs, act, logp = raw["obs"], raw["act"], raw["logp"]
    n = obs.shape[0]
    th = np.unwrap(np.arctan2(obs[..., 1].astype(np.float64), obs[..., 0].astype(np.float64)), axis=1)
    x = np.stack([th, obs[..., 2].astype(np.float64)], axis=-1)  # (n, 201, 2)
    z = np.zeros((n, 202, 4))
    z[:, 0, :2] = x[:, 0]
    z[:, 1:, :2], z[:, 1:, 2], z[:, 1:, 3] = x, act, 1.0
    cost = np.full((n, 202), np.nan)
    cost[:, 0], cost[:, 1:201] = 0.0, -raw["reward"]
    blp = np.full((n, 202), np.nan)
    blp[:, :201] = logp
    u = np.full((n, 202, 1), np.nan)
    u[:, :201, 0] = z[:, :201, 2]
    observation = np.concatenate([obs[:, :1], obs], axis=1).astype(np.float64)
    ds = pdata.make_dataset(
        z, input=u, cost=cost, behavior_logp=blp, dt=DT, system="gymnasium Pendulum-v1",
        attrs=dict(layout="state-action chain z=(th, thdot, a, started)", behaviour=name, sigma=sigma),
    )  # fmt: skip
    ds["observation"] = (("episode", "time", "observation_dim"), observation)
    steps = np.zeros((n, 202), bool)
    for key in ("terminated", "truncated"):
        s = steps.copy()
        s[:, 1:201] = raw[key]
        ds[key] = (("episode", "time"), s)
    pdata.save(ds, path)
    return pdata.open(path)


def d3rlpy_dataset(ds):
    """The same log as a d3rlpy ``MDPDataset``: observation, action, reward of each gymnasium step."""
    import d3rlpy

    obs = np.asarray(ds["observation"].values)[:, 1:201].astype(np.float32)
    act = np.asarray(ds["state"].values)[:, 1:201, 2:3].astype(np.float32)
    rew = -np.asarray(ds["cost"].values)[:, 1:201].astype(np.float32)
    term = np.asarray(ds["terminated"].values)[:, 1:201]
    trunc = np.asarray(ds["truncated"].values)[:, 1:201]
    n, T = rew.shape
    return d3rlpy.dataset.MDPDataset(
        obs.reshape(n * T, -1), act.reshape(n * T, -1), rew.reshape(-1), term.reshape(-1).astype(np.float32),
        timeouts=trunc.reshape(-1).astype(np.float32),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- the chain
class StartState(AbstractInitial):
    """The start state ``(x0, a = 0, started = 0)`` of the chain, ``x0`` from ``base``."""

    base: AbstractInitial

    def sample(self, key):
        x = self.base.sample(key)
        return jnp.concatenate([x, jnp.zeros((2,), x.dtype)])


def pendulum_step(x, u, p1, p2):
    """Pendulum-v1's step with physical parameters ``p1 = 3g/(2l)``, ``p2 = 3/(m l^2)`` (15 and 3 in gymnasium)."""
    th, thdot = x[0], x[1]
    newthdot = jnp.clip(thdot + (p1 * jnp.sin(th) + p2 * jnp.clip(u, -TORQUE, TORQUE)) * DT, -SPEED, SPEED)
    return jnp.stack([th + newthdot * DT, newthdot])


def chain_problem(static, sigma, *, params=None, gamma, horizon, low=(-np.pi, -1.0), high=(np.pi, 1.0)):
    """The Gaussian policy ``N(mean_theta(x), sigma^2)`` clipped to +-2 on Pendulum-v1 as a state-action chain.

    ``params``: ``{"p1", "p2"}`` of the plant used to *simulate* (the model-based path); ``None``: no plant (the
    model-free path never simulates; the chain then holds ``x`` fixed in ``sample``, and only its transition density
    and cost, which do not involve the plant, are used)."""

    def mean(x, theta):
        return eqx.combine(theta, static)(x)

    def sample_fn(key, z, theta):
        x, a, started = z[:2], z[2], z[3]
        moved = x if params is None else pendulum_step(x, a, params["p1"], params["p2"])
        x1 = jnp.where(started > 0.5, moved, x)
        a1 = jnp.clip(mean(x1, theta) + sigma * jax.random.normal(key, (), z.dtype), -TORQUE, TORQUE)
        return jnp.concatenate([x1, a1[None], jnp.ones((1,), z.dtype)])

    def log_prob_fn(z, z1, theta):
        return censored_logp(z1[2], mean(z1[:2], theta), sigma)

    def cost(z, theta):
        th, thdot, a = z[0], z[1], z[2]
        c = angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * a**2
        return jnp.where(z[3] > 0.5, c / gamma, 0.0)

    system = pydso.MarkovChain(sample_fn, log_prob_fn, reparameterized=params is not None)
    initial = StartState(pydso.Uniform(low, high))
    return pydso.Problem(system, cost, pydso.Episodic(gamma, horizon), initial, name="Pendulum-v1 state-action chain")


def plant_model(guess):
    """The grey-box sysid model of the chain's plant: ``z' = (f(x, u; p1, p2), 0, 1)`` after the start step, driven
    by the logged action ``u_t`` (the store's ``input``). The next action is not predicted: its channel gets a huge
    output scale in the fit, so it does not weigh in the loss."""

    def f(z, u, p):
        x, started = z[:2], z[3]
        x1 = jnp.where(started > 0.5, pendulum_step(x, u[0], p["p1"], p["p2"]), x)
        return jnp.concatenate([x1, jnp.zeros((1,), z.dtype), jnp.ones((1,), z.dtype)])

    return sysid.DiscreteModel(f, None, dict(guess), x0=np.zeros(4), estimate_x0=False, name="pendulum grey box")


# ----------------------------------------------------------------------------------------------- pydso paths
def run_certified(ds, theta_b, static, settings, seed=0):
    cfg = settings["certified"]
    problem = chain_problem(static, settings["sigma"], gamma=cfg["gamma"], horizon=201)
    method = pydso.Proximal(
        n=0, epochs=cfg["epochs"], minibatch=cfg["minibatch"], learning_rate=cfg["learning_rate"], variant="clip",
        clip_eps=cfg["clip_eps"],
    )  # fmt: skip
    t, c = time.perf_counter(), time.process_time()
    r = certified_improve(
        problem, theta_b, ds.load(), key=jax.random.key(seed), method=method, iterations=cfg["iterations"],
        budget=ESSBudget(), holdout=cfg["holdout"],
    )  # fmt: skip
    jax.block_until_ready(r.theta)
    train_s, train_cpu = time.perf_counter() - t, time.process_time() - c
    n_train = r.episodes[0]
    adam_steps = (len(r.iterates) - 1) * cfg["epochs"] * -(-n_train // cfg["minibatch"])
    info = dict(
        certified=r.certified, iterate=r.iterate, iterates=len(r.iterates) - 1, lower_bound=r.lower_bound,
        estimate=r.estimate, ess=r.ess, ess_threshold=r.ess_threshold, ess_history=r.history["ess"].tolist(),
        lower_bound_history=r.history["lower_bound"].tolist(), reason=r.reason, episodes=list(r.episodes),
        optimisation_steps=int(adam_steps), optimisation_steps_note="Adam steps (iterations x epochs x minibatches)",
    )  # fmt: skip
    return r.theta, train_s, train_cpu, info


def run_model_based(ds, theta_b, static, settings, seed=0):
    cfg, sigma = settings["model_based"], settings["sigma"]
    low, high = (-np.pi, -cfg["train_speed"]), (np.pi, cfg["train_speed"])

    def make_problem(params):
        horizon = cfg["horizon"]
        return chain_problem(static, sigma, params=params, gamma=cfg["gamma"], horizon=horizon, low=low, high=high)

    schedule = optax.cosine_decay_schedule(cfg["lr"], cfg["steps"], alpha=cfg["final_lr_fraction"])
    optimizer = optax.chain(optax.clip_by_global_norm(cfg["clip"]), optax.adam(schedule))
    method = pydso.Gradient(optimizer, estimator=pydso.Pathwise(), n=cfg["n"])
    t, c = time.perf_counter(), time.process_time()
    r = model_based_improve(
        ds.load(), theta_b, key=jax.random.key(seed), model=plant_model(cfg["guess"]), make_problem=make_problem,
        steps=cfg["steps"], method=method, eval_episodes=cfg["eval_episodes"],
        fit_options=dict(output_scale=[1.0, 1.0, 1e8, 1.0], x0=np.asarray(ds["state"].values)[:, 0]),
    )  # fmt: skip
    jax.block_until_ready(r.theta)
    train_s, train_cpu = time.perf_counter() - t, time.process_time() - c
    fit = r.fit
    info = dict(
        identified=dict(p1=float(fit.params["p1"]), p2=float(fit.params["p2"]), true=dict(p1=15.0, p2=3.0)),
        sysid_steps=int(fit.n_steps), dso_steps=cfg["steps"], model_objective=list(r.model_objective),
        check={k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in r.check.items()},
        certified=bool(r.check["certified"]), ess=float(r.check["ess"]),
        ess_floor=ESSBudget().threshold(r.check["n"]),
        certified_above_ess_floor=bool(r.check["certified"]) and r.check["ess"] >= ESSBudget().threshold(r.check["n"]),
        ci={str(k): [float(lo), float(hi)] for k, lo, hi in zip(fit.names, fit.ci_low, fit.ci_high, strict=True)},
        optimisation_steps=int(fit.n_steps) + cfg["steps"],
        optimisation_steps_note="Levenberg-Marquardt steps of the fit + DSO (Adam) steps on the model",
    )  # fmt: skip
    return r.theta, train_s, train_cpu, info


# ---------------------------------------------------------------------------------------------- evaluation
def gym_evaluate(act, n=EVAL_EPISODES, seed=EVAL_SEED):
    """Undiscounted returns of ``n`` seeded gymnasium Pendulum-v1 episodes run in lockstep; ``act(obs (n, 3)
    float32) -> (n,)`` torques (clipped to [-2, 2] here)."""
    import gymnasium as gym

    envs = [gym.make("Pendulum-v1") for _ in range(n)]
    o = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    total = np.zeros(n)
    for _ in range(200):
        a = np.clip(np.asarray(act(o), np.float64).reshape(n), -TORQUE, TORQUE)
        steps = [env.step(np.array([a[i]])) for i, env in enumerate(envs)]
        o = np.stack([s[0] for s in steps])
        total += np.array([s[1] for s in steps])
        assert not any(s[2] for s in steps)
    return total


def pydso_actor(model):
    f = jax.jit(jax.vmap(model.act))
    return lambda o: np.asarray(f(jnp.asarray(o, jnp.float64)))


def evaluate(act):
    t = time.perf_counter()
    r = gym_evaluate(act)
    return dict(mean=float(r.mean()), std=float(r.std()), eval_s=time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------------- main
def run_d3rlpy(name, dataset, steps, seed=0):
    import d3rlpy

    configs = dict(
        BC=d3rlpy.algos.BCConfig, CQL=d3rlpy.algos.CQLConfig, IQL=d3rlpy.algos.IQLConfig,
        TD3PlusBC=d3rlpy.algos.TD3PlusBCConfig,
    )  # fmt: skip
    d3rlpy.seed(seed)
    scaler = d3rlpy.preprocessing.MinMaxActionScaler(minimum=-TORQUE, maximum=TORQUE)
    algo = configs[name](action_scaler=scaler).create(device="cpu:0")
    t, c = time.perf_counter(), time.process_time()
    algo.fit(
        dataset, n_steps=steps, n_steps_per_epoch=steps, show_progress=False, save_interval=10**9,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )  # fmt: skip
    return algo, time.perf_counter() - t, time.process_time() - c


def table(results):
    lines = [
        "| log | method | return (100 gym episodes) | train wall s | train CPU s | eval s | steps | certified / ESS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for log, rows in results.items():
        for name, r in rows.items():
            cert = ""
            if "certified" in r:
                cert = f"{'yes' if r['certified'] else 'no'} / {r['ess']:.1f}"
            train = f"{r['train_s']:.1f}" if r.get("train_s") is not None else "-"
            cpu = f"{r['train_cpu_s']:.1f}" if r.get("train_cpu_s") is not None else "-"
            steps = str(r.get("steps", "-"))
            lines.append(
                f"| {log} | {name} | {r['return_mean']:.1f} ± {r['return_std']:.1f} | {train} | {cpu} | "
                f"{r['eval_s']:.1f} | {steps} | {cert} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="gradient steps per d3rlpy algorithm")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 episodes per log, 50 gradient steps")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/offline_pendulum.json)")
    parser.add_argument("--data-dir", default=None, help="where the two pydso stores are written (default: a temp dir)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--only", default=None, help="comma-separated subset of methods (debugging)")
    args = parser.parse_args(argv)
    import d3rlpy
    import gymnasium
    import torch

    settings = dict(QUICK if args.quick else SETTINGS)
    if args.steps is not None:
        settings["gradient_steps"] = args.steps
    if args.torch_threads is not None:
        settings["torch_threads"] = args.torch_threads
    if settings["torch_threads"]:
        torch.set_num_threads(settings["torch_threads"])
    out = args.out if args.out is not None else (None if args.quick else str(RESULT))
    only = None if args.only is None else set(args.only.split(","))
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="pydso_offline_pendulum_")
    t_all = time.perf_counter()
    print(f"pydso {pydso.__version__}, jax {jax.__version__}, d3rlpy {d3rlpy.__version__}, torch {torch.__version__}")
    behaviours = behaviour_policies(settings)
    results, logs = {}, {}
    for log_name, model in behaviours.items():
        theta_b, static = eqx.partition(model, eqx.is_array)
        raw = collect(model, settings["episodes"], settings["sigma"], settings["log_seeds"][log_name])
        path = os.path.join(data_dir, f"pendulum_{log_name}.zarr")
        ds = write_store(raw, path, log_name, settings["sigma"])
        logs[log_name] = dict(
            store=path, episodes=int(raw["obs"].shape[0]), transitions=int(raw["reward"].size),
            logged_return_mean=float(raw["reward"].sum(1).mean()), logged_return_std=float(raw["reward"].sum(1).std()),
        )  # fmt: skip
        print(f"log {log_name}: {logs[log_name]}", flush=True)
        rows = {}
        ev = evaluate(pydso_actor(model))
        rows["behaviour (mean action)"] = dict(return_mean=ev["mean"], return_std=ev["std"], eval_s=ev["eval_s"])
        for name, runner in (("pydso certified off-policy", run_certified), ("pydso model-based", run_model_based)):
            if only and name not in only:
                continue
            theta, train_s, train_cpu, info = runner(ds, theta_b, static, settings)
            ev = evaluate(pydso_actor(eqx.combine(theta, static)))
            rows[name] = dict(
                return_mean=ev["mean"], return_std=ev["std"], train_s=train_s, train_cpu_s=train_cpu,
                eval_s=ev["eval_s"], steps=info["optimisation_steps"], **info,
            )  # fmt: skip
            print(f"  {name}: {ev['mean']:.1f} +- {ev['std']:.1f}, train {train_s:.1f} s; {info}", flush=True)
        dataset = d3rlpy_dataset(ds)
        for name in ("BC", "CQL", "IQL", "TD3PlusBC"):
            if only and f"d3rlpy {name}" not in only:
                continue
            algo, train_s, train_cpu = run_d3rlpy(name, dataset, settings["gradient_steps"])
            ev = evaluate(lambda o, algo=algo: algo.predict(np.asarray(o, np.float32))[:, 0])
            rows[f"d3rlpy {name}"] = dict(
                return_mean=ev["mean"], return_std=ev["std"], train_s=train_s, train_cpu_s=train_cpu,
                eval_s=ev["eval_s"], steps=settings["gradient_steps"],
            )  # fmt: skip
            print(f"  d3rlpy {name}: {ev['mean']:.1f} +- {ev['std']:.1f}, train {train_s:.1f} s", flush=True)
        results[log_name] = rows
    summary = {}
    for log_name, rows in results.items():
        py = {k: v for k, v in rows.items() if k.startswith("pydso")}
        d3 = {k: v for k, v in rows.items() if k.startswith("d3rlpy")}
        if py and d3:
            bp = max(py, key=lambda k: py[k]["return_mean"])
            bd = max(d3, key=lambda k: d3[k]["return_mean"])
            summary[log_name] = dict(
                best_pydso=bp, best_pydso_return=py[bp]["return_mean"], best_pydso_train_s=py[bp]["train_s"],
                best_d3rlpy=bd, best_d3rlpy_return=d3[bd]["return_mean"], best_d3rlpy_train_s=d3[bd]["train_s"],
                pydso_wins_return=py[bp]["return_mean"] > d3[bd]["return_mean"],
                pydso_faster=py[bp]["train_s"] < d3[bd]["train_s"],
            )  # fmt: skip
    record = dict(
        benchmark="offline Pendulum-v1: pydso vs d3rlpy on the same logs (issue 15)",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     python=platform.python_version()),
        versions=dict(pydso=pydso.__version__, jax=jax.__version__, d3rlpy=d3rlpy.__version__,
                      torch=torch.__version__, gymnasium=gymnasium.__version__, numpy=np.__version__),
        settings=dict(settings, eval_episodes=EVAL_EPISODES, eval_seeds=f"reset(seed={EVAL_SEED} + i), i < 100",
                      d3rlpy_configs="documented defaults + MinMaxActionScaler(minimum=-2, maximum=2), device cpu",
                      timing="train_s: wall time of training only (pydso cold, JAX compilation included; d3rlpy "
                             "from algo.fit, MDPDataset built before); train_cpu_s: process CPU time (all threads); "
                             "eval_s: 100 gymnasium episodes"),
        logs=logs, results=results, summary=summary, total_wall_s=time.perf_counter() - t_all,
    )  # fmt: skip
    print(table(results))
    print(json.dumps(summary, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"saved {out}")
    return record


if __name__ == "__main__":
    main()
