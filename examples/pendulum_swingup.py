"""Pendulum swing-up with pydso: the closed loop of gymnasium's ``Pendulum-v1`` optimised directly.

The plant is exactly gymnasium's ``Pendulum-v1`` (g = 10, m = l = 1, dt = 0.05, torque clipped to +-2, speed clipped
to +-8, semi-implicit Euler update, cost ``angle_normalize(th)^2 + 0.1 thdot^2 + 0.001 u^2`` on the clipped torque,
200-step episodes from ``th ~ U[-pi, pi]``, ``thdot ~ U[-1, 1]``). The policy is a 2x64 tanh MLP of gymnasium's
observation ``(cos th, sin th, thdot)`` (rounded to float32, as the environment returns it) with output
``2 tanh(.)``. Plugged into the plant it gives a deterministic closed loop ``x' = f(x, theta)``:
a :class:`pydso.DeterministicMap`, optimised by backpropagation through the rollout
(``method=pydso.Gradient(optimizer, estimator=pydso.Pathwise(), n=n)``).

Training is deliberately *well conditioned* (DESIGN.md §3): a short horizon (50 steps) with discount 0.93, many
random starts per step, a global-norm clip and a cosine-decayed Adam step. Long, weakly discounted horizons make the
pathwise gradient explode on this chaotic system. Starts are drawn with ``|thdot| <= 3`` (wider than the task's
``|thdot| <= 1``) so the fast states of a swing-up are seen from the first step; the evaluation uses the task's own
distribution and its exact undiscounted 200-step return.

The plant, the policy class and the task live in :mod:`pydso.problems.control`
(:func:`~pydso.problems.control.pendulum`); this script trains and reports. Run
``python examples/pendulum_swingup.py [--steps N] [--seed S] [--out DIR]``; ``train`` and ``evaluate`` are
importable (``tests/test_pendulum_gym.py`` checks the physics and the return against gymnasium itself).
"""

import argparse
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pydso
from pydso.problems import control

# --------------------------------------------------------------------------------- Pendulum-v1 (pydso.problems.control)
G, M, L, DT = (control.PENDULUM[k] for k in ("g", "m", "l", "dt"))
MAX_SPEED, MAX_TORQUE = control.PENDULUM["max_speed"], control.PENDULUM["max_torque"]
EPISODE_STEPS = control.PENDULUM["episode_steps"]
TASK_LOW, TASK_HIGH = np.array([-np.pi, -1.0]), np.array([np.pi, 1.0])

# Training defaults (see the module docstring); tuned for robustness over seeds and for speed.
DEFAULTS = dict(steps=200, n=64, horizon=50, gamma=0.93, lr=1e-2, final_lr_fraction=0.1, clip=1.0, train_speed=3.0)

angle_normalize = control.angle_normalize
observe = control.pendulum_observe  # gymnasium's observation (cos th, sin th, thdot), rounded to float32
Policy = control.MLPPolicy  # u = 2 tanh(MLP(obs)); .act(obs) from gymnasium's observation, __call__(x) from the state


def init_policy(seed: int = 0) -> Policy:
    """A freshly initialised 2x64 tanh policy (:func:`pydso.problems.control.pendulum`'s default)."""
    task = control.pendulum(key=jax.random.key(seed))
    return task.policy(task.theta0)


def make_problem(static, *, gamma=1.0, horizon=EPISODE_STEPS, low=TASK_LOW, high=TASK_HIGH) -> pydso.Problem:
    """The Pendulum-v1 closed loop as a pydso problem (:func:`pydso.problems.control.pendulum_problem`); ``theta``
    is the policy's array leaves, ``static`` the rest. With the defaults, the objective of one episode is exactly
    minus gymnasium's 200-step return.
    """
    return control.pendulum_problem(static, gamma=gamma, horizon=horizon, low=low, high=high)


def split(model: Policy):
    """``(theta, static)``: theta is a pytree of the model's arrays (what pydso optimises)."""
    return eqx.partition(model, eqx.is_array)


def train(
    steps: int = DEFAULTS["steps"],
    seed: int = 0,
    progress: bool | None = None,
    *,
    n: int = DEFAULTS["n"],
    horizon: int = DEFAULTS["horizon"],
    gamma: float = DEFAULTS["gamma"],
    lr: float = DEFAULTS["lr"],
    clip: float = DEFAULTS["clip"],
    train_speed: float = DEFAULTS["train_speed"],
    callback=None,
):
    """Train the swing-up policy; returns ``(model, result, info)``.

    ``model`` is the trained :class:`Policy`, ``result`` pydso's :class:`~pydso.OptimizeResult` (theta = the
    model's arrays), ``info`` a dict with the wall time (compilation included), the environment steps simulated
    and the training settings. ``callback(StepInfo)`` is passed to :func:`pydso.minimize`.
    """
    model0 = init_policy(seed)
    theta0, static = split(model0)
    problem = make_problem(static, gamma=gamma, horizon=horizon, low=[-np.pi, -train_speed], high=[np.pi, train_speed])
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=DEFAULTS["final_lr_fraction"])
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))
    t0 = time.perf_counter()
    result = pydso.minimize(
        problem,
        theta0,
        key=jax.random.key(seed + 10_000),
        steps=steps,
        method=pydso.Gradient(optimizer, estimator=pydso.Pathwise(), n=n),
        callback=callback,
        progress=progress,
    )
    jax.block_until_ready(result.theta)
    wall = time.perf_counter() - t0
    model = eqx.combine(result.theta, static)
    info = dict(
        wall_s=wall,
        env_steps=result.steps * n * horizon,
        problem=problem,
        static=static,
        settings=dict(
            steps=steps, seed=seed, n=n, horizon=horizon, gamma=gamma, lr=lr, clip=clip, train_speed=train_speed
        ),
    )
    return model, result, info


def evaluate(model: Policy, n_episodes: int = 100, seed: int = 0) -> np.ndarray:
    """Exact undiscounted 200-step Pendulum-v1 returns (``-sum of costs``) from ``n_episodes`` random starts."""
    theta, static = split(model)
    traj = pydso.rollout(make_problem(static), theta, key=jax.random.key(seed), n=n_episodes)
    return -np.asarray(traj.costs).sum(axis=1)


def returns_from(model: Policy, x0s) -> np.ndarray:
    """Exact 200-step returns of the episodes starting at the given states ``x0s`` (shape ``(k, 2)``)."""
    theta, static = split(model)
    base = make_problem(static)

    @jax.jit
    def run(theta, x0s):
        def one(x0):
            problem = pydso.Problem(base.system, base.cost, base.setting, pydso.Fixed(x0), name=base.name)
            return -pydso.rollout(problem, theta, key=jax.random.key(0), n=1, check=False).costs.sum()

        return jax.vmap(one)(x0s)

    return np.asarray(run(theta, jnp.asarray(x0s, dtype=jnp.float64)))


def swingup_trajectory(model: Policy):
    """States ``(201, 2)`` and torques ``(200,)`` of the episode starting at rest at the bottom (th = pi)."""
    theta, static = split(model)
    problem = make_problem(static)
    problem = pydso.Problem(problem.system, problem.cost, problem.setting, pydso.Fixed([np.pi, 0.0]))
    traj = pydso.rollout(problem, theta, key=jax.random.key(0), n=1)
    states = np.asarray(traj.states[0])
    torques = np.asarray(jax.vmap(model)(jnp.asarray(states[:-1])))
    return states, torques, -float(np.asarray(traj.costs).sum())


def grad_forward_ratio(model: Policy, n: int, horizon: int, gamma: float, repeats: int = 10):
    """Time of one jitted pathwise gradient / one jitted rollout of the same batch (after warm-up)."""
    theta, static = split(model)
    problem = make_problem(static, gamma=gamma, horizon=horizon)
    forward = jax.jit(lambda th, k: pydso.rollout(problem, th, key=k, n=n, check=False).objective.mean())
    gradient = jax.jit(lambda th, k: pydso.pathwise_gradient(problem, th, key=k, n=n).gradient)

    def best_time(f):
        jax.block_until_ready(f(theta, jax.random.key(0)))
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(theta, jax.random.key(i + 1)))
            times.append(time.perf_counter() - t)
        return min(times)

    t_fwd, t_grad = best_time(forward), best_time(gradient)
    return t_grad / t_fwd, t_fwd, t_grad


def save_outputs(out: str, model: Policy, result: pydso.OptimizeResult, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    ax = result.plot(label="pathwise, discounted training objective")
    ax.set_title("Pendulum-v1 swing-up: pydso learning curve")
    ax.figure.tight_layout()
    ax.figure.savefig(os.path.join(out, "pendulum_learning_curve.png"), dpi=120)
    plt.close(ax.figure)

    states, torques, ret = swingup_trajectory(model)
    t = np.arange(states.shape[0]) * DT
    fig, axes = plt.subplots(3, 1, figsize=(6, 6), sharex=True)
    axes[0].plot(t, states[:, 0])
    for k in range(-2, 3):
        axes[0].axhline(k * np.pi, color="0.6" if k % 2 else "tab:green", lw=0.8, ls=":" if k % 2 else "--")
    axes[0].set_ylim(min(-0.5, states[:, 0].min() - 0.3), max(0.5, states[:, 0].max() + 0.3))
    axes[0].set_ylabel("angle th (rad)\n0, 2pi = up; pi = down")
    axes[1].plot(t, states[:, 1])
    axes[1].set_ylabel("speed (rad/s)")
    axes[2].step(t[:-1], torques, where="post")
    axes[2].set_ylabel("torque")
    axes[2].set_xlabel("time (s)")
    for a in axes:
        a.grid(True, alpha=0.3)
    axes[0].set_title(f"swing-up from rest at the bottom (return {ret:.1f})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pendulum_swingup.png"), dpi=120)
    plt.close(fig)

    eqx.tree_serialise_leaves(os.path.join(out, "pendulum_policy.eqx"), model)
    theta, _ = split(model)
    flat = jax.tree_util.tree_flatten_with_path(theta)[0]
    np.savez(
        os.path.join(out, "pendulum_policy.npz"),
        **{jax.tree_util.keystr(path).lstrip("."): np.asarray(leaf) for path, leaf in flat},
    )
    with open(os.path.join(out, "pendulum_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimisation steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(here, "output"), help="output folder")
    parser.add_argument("--eval-episodes", type=int, default=100)
    args = parser.parse_args(argv)

    print(f"pydso {pydso.__version__}, jax {jax.__version__} on {jax.devices()[0].platform}; training {DEFAULTS}")

    def report(info: pydso.StepInfo):
        if (info.step + 1) % 25 == 0 or info.step == 0:
            print(
                f"  step {info.step + 1:4d}  J = {info.objective:9.3f} +- {info.objective_stderr:.3f}"
                f"  |grad| = {info.grad_norm:.3g}",
                flush=True,
            )

    model, result, info = train(steps=args.steps, seed=args.seed, progress=None, callback=report)
    returns = evaluate(model, args.eval_episodes, seed=args.seed + 1)
    s = info["settings"]
    ratio, t_fwd, t_grad = grad_forward_ratio(model, s["n"], s["horizon"], s["gamma"])
    summary = dict(
        mean_return=float(returns.mean()),
        std_return=float(returns.std()),
        eval_episodes=int(args.eval_episodes),
        train_wall_s=info["wall_s"],
        env_steps=info["env_steps"],
        grad_forward_ratio=ratio,
        forward_ms=t_fwd * 1e3,
        gradient_ms=t_grad * 1e3,
        settings=s,
    )
    print(
        f"return over {args.eval_episodes} fresh random starts: {returns.mean():.1f} +- {returns.std():.1f} "
        f"(min {returns.min():.1f}; Pendulum-v1 is 'solved' at about -200)"
    )
    print(f"training wall time {info['wall_s']:.2f} s (compilation included), {info['env_steps']} simulated env steps")
    print(
        f"pathwise gradient / rollout time: {ratio:.1f} ({t_grad * 1e3:.2f} ms / {t_fwd * 1e3:.2f} ms, "
        f"{s['n']} episodes x {s['horizon']} steps)"
    )
    save_outputs(args.out, model, result, summary)
    print(f"saved learning curve, swing-up plot and parameters to {args.out}")
    return summary


if __name__ == "__main__":
    main()
