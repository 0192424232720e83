"""Off-policy improvement from logs: record a closed loop under a poor policy to zarr, then improve the policy from
the stored log alone (proximal surrogate with per-decision importance weights), plotting the true return and the
effective sample size (ESS) of the log per iteration.

Default system: **Pendulum-v1** (``--system pendulum``). The plant and the policy are those of
``examples/pendulum_swingup.py`` (imported, not copied): gymnasium's Pendulum-v1 step and the 2x64 tanh MLP
``u = 2 tanh(MLP(cos th, sin th, thdot))``. Modelling choice: Pendulum-v1 and the MLP are deterministic, and a
deterministic closed loop has no transition density, so nothing could be importance-weighted. The *logged* closed
loop is therefore made stochastic: a :class:`pydso.GaussianChain`

    x' = f(x, theta) + diag(SIGMA) eps,    eps ~ N(0, I),    SIGMA = (0.03 rad, 0.3 rad/s) per 0.05 s step,

whose mean ``f`` is the exact Pendulum-v1 step under the policy's (mean) torque, with small diagonal process noise on
``(th, thdot)`` (a ``thdot`` kick of 0.3 rad/s is what a torque of 2 applied for one step gives). The noise plays the
role of the exploration of a stochastic policy: a change of theta shifts the mean of the next state, and the ratio
of the two Gaussian densities reweights the logged transitions. Smaller noise makes the log-densities sharper, so the
importance weights degenerate after smaller policy changes. Cost: Pendulum-v1's per-step cost, discounted by 0.97
over 100 steps from the task's start distribution. The behaviour is a freshly initialised MLP (it does not swing up
or balance: a poor policy).

The learning never simulates: it is ``pydso.minimize`` with the method ``pydso.Proximal(n=0, data=log, ...)`` —
each step minimises a clipped PPO-like surrogate built from the *same* log, reweighted to the current iterate
(``n=0``: no fresh episodes). The fresh rollouts at every iterate only *evaluate* it (the true discounted cost ``J``
of the noisy closed loop, and the exact undiscounted 200-step Pendulum-v1 return of the noise-free closed loop); they
are never used for training.

``--system lqr``: the earlier, cheaper case x' = A x + B u + w, u = -K x (a double integrator) under a poor gain
(:func:`lqr_problem`, :func:`record_log`, :func:`improve_from_log`, :func:`plot_history` stay importable).

Run ``python examples/offpolicy_from_logs.py [--system pendulum|lqr] [--iterations N] [--quick]``; quick mode (also
``PYDSO_NOTEBOOK_QUICK=1``) uses a smaller log and fewer epochs, to check that everything runs.
"""

import argparse
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import pydso  # noqa: E402
from pydso import data as pdata  # noqa: E402
from pydso import estimators  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pendulum_swingup as ps  # noqa: E402  (the Pendulum-v1 physics and the MLP policy)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")

# Pendulum settings (module docstring). FULL: the script's default; QUICK: a smoke run (< 30 s with compilation).
SIGMA = (0.03, 0.3)
PENDULUM = dict(
    gamma=0.97,
    horizon=100,
    episodes=256,
    iterations=8,
    epochs=20,
    minibatch=64,
    learning_rate=1e-2,
    clip_eps=0.2,
    eval_episodes=1000,
    gym_episodes=100,
)
PENDULUM_QUICK = dict(PENDULUM, iterations=2, epochs=5, eval_episodes=300, gym_episodes=20)


def quick_mode() -> bool:
    """True when ``PYDSO_NOTEBOOK_QUICK`` is set to something other than ``0`` (tests/test_notebooks.py sets it)."""
    return os.environ.get("PYDSO_NOTEBOOK_QUICK", "") not in ("", "0")


# ------------------------------------------------------------------------------------------------------ LQR
def lqr_problem(horizon=60):
    dt = 0.1
    A = jnp.array([[1.0, dt], [0.0, 1.0]])
    B = jnp.array([[0.0], [dt]])

    def mean(x, K):
        return A @ x - B @ (K @ x)

    def cost(x, K):
        u = -K @ x
        return x @ x + 0.1 * u @ u

    return pydso.Problem(
        pydso.GaussianChain(mean, 0.1), cost, pydso.Episodic(0.9, horizon), pydso.Normal(jnp.zeros(2), 1.0), name="lqr"
    )


def record_log(problem, K_b, store, episodes=1000, seed=0):
    """Roll out ``episodes`` closed-loop episodes under the behaviour parameters ``K_b``, save them as a pydso store
    at ``store`` (overwriting) and return the store opened lazily."""
    traj = pydso.rollout(problem, K_b, key=jax.random.key(seed), n=episodes)
    pdata.save(pdata.to_dataset(traj, problem, K_b), store, overwrite=True)
    return pdata.open(store)


# ------------------------------------------------------------------------------------------------- Pendulum
def pendulum_problem(static, *, sigma=SIGMA, gamma=PENDULUM["gamma"], horizon=PENDULUM["horizon"]):
    """The logged closed loop: Pendulum-v1 under the MLP ``eqx.combine(theta, static)`` with Gaussian process noise
    of standard deviations ``sigma`` on ``(th, thdot)`` (a :class:`pydso.GaussianChain` whose mean is the exact
    Pendulum-v1 step of ``examples/pendulum_swingup.py``); discounted Pendulum-v1 cost over ``horizon`` steps from
    the task's start distribution."""
    det = ps.make_problem(static, gamma=gamma, horizon=horizon)
    system = pydso.GaussianChain(det.system.step_fn, jnp.asarray(sigma, dtype=jnp.float64))
    return pydso.Problem(system, det.cost, det.setting, det.initial, name="Pendulum-v1 + process noise")


def behaviour_policy(seed=0):
    """``(theta_b, static)`` of the poor behaviour policy: a freshly initialised MLP of ``pendulum_swingup``."""
    return ps.split(ps.init_policy(seed))


def record_rollout_log(problem, theta_b, store, episodes=PENDULUM["episodes"], seed=0):
    """Simulate ``episodes`` episodes under ``theta_b`` straight into the zarr store ``store`` (replacing it) with
    ``pydso.rollout(..., record=store)``; returns the store opened lazily (states, costs, behaviour log-densities)."""
    if os.path.exists(store):
        shutil.rmtree(store)
    return pydso.rollout(problem, theta_b, key=jax.random.key(seed), n=episodes, record=store)


def gym_return(static, episodes=PENDULUM["gym_episodes"], seed=1):
    """``theta -> mean exact undiscounted 200-step Pendulum-v1 return`` of the noise-free closed loop, over fixed
    random starts of the task (compiled once)."""
    problem = ps.make_problem(static)
    key = jax.random.key(seed)
    return lambda theta: float(-jnp.mean(jnp.sum(pydso.rollout(problem, theta, key=key, n=episodes).costs, axis=1)))


# ------------------------------------------------------------------------------------------------- the loop
def improve_from_log(
    problem,
    K0,
    ds,
    iterations=6,
    eval_episodes=2000,
    verbose=True,
    *,
    epochs=15,
    minibatch=250,
    learning_rate=0.03,
    clip_eps=0.2,
    episodes_per_chunk=500,
    metrics=None,
    describe=None,
    seed=0,
):
    """Improve the parameters from the log ``ds`` alone: ``iterations`` proximal steps from ``K0``.

    One call of :func:`pydso.minimize` with ``pydso.Proximal(n=0, data=ds, ...)``: every step minimises the clipped
    surrogate (``epochs`` passes of Adam over minibatches of ``minibatch`` logged episodes) built from the *same* log,
    reweighted to the current iterate. The callback evaluates each iterate: ``metrics`` is an optional dict
    ``name -> f(theta)`` of extra evaluations (e.g. the Pendulum-v1 return), recorded in ``history``;
    ``describe(theta)`` a short string printed for each iterate.

    Returns ``(K, J, ess, gains)`` (with ``metrics``: ``(K, J, ess, gains, history)``): the final parameters, the
    true J (fresh rollouts, evaluation only), the episode ESS of the log reweighted to each iterate
    (``iterations + 1`` entries each), and the list of iterates.
    """
    J, ess, gains = [], [], []
    history = {name: [] for name in metrics or {}}
    n = ds.sizes["episode"]

    def record(it, K, ess_it):
        J.append(float(jnp.mean(pydso.rollout(problem, K, key=jax.random.key(100 + it), n=eval_episodes).objective)))
        ess.append(ess_it)
        gains.append(K)
        for name, f in (metrics or {}).items():
            history[name].append(f(K))
        if verbose:
            what = describe(K) if describe is not None else f"K = {np.asarray(K).ravel()}"
            extra = "".join(f", {name} = {v[-1]:.1f}" for name, v in history.items())
            print(f"iteration {it}: {what}, J = {J[-1]:.3f}{extra}, ESS = {ess[-1]:.1f} / {n}", flush=True)

    record(0, K0, estimators.ess_report(problem, K0, ds, warn_below=None)["episode"])
    K = K0
    if iterations:
        method = pydso.Proximal(
            n=0,
            data=ds,
            epochs=epochs,
            minibatch=minibatch,
            learning_rate=learning_rate,
            variant="clip",
            clip_eps=clip_eps,
            episodes_per_chunk=episodes_per_chunk,
        )
        # each step reports the ESS of the log at its result as the extra scalar "ess_final"
        result = pydso.minimize(
            problem,
            K0,
            key=jax.random.key(seed),
            steps=iterations,
            method=method,
            callback=lambda info: record(info.step + 1, info.theta, info.extra["ess_final"]),
        )
        K = result.theta
    if metrics is not None:
        return K, J, ess, gains, history
    return K, J, ess, gains


def plot_history(J, ess, returns=None, n=None):
    """Figure of the true J (and, if given, the Pendulum-v1 ``returns``) and the ESS of the log per iteration."""
    panels = 3 if returns is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5))
    axes[0].plot(J, "o-")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("true J (fresh rollouts)")
    if returns is not None:
        axes[1].plot(returns, "o-", color="tab:green")
        axes[1].set_xlabel("iteration")
        axes[1].set_ylabel("Pendulum-v1 return (200 steps)")
    axes[-1].plot(ess, "o-", color="tab:red")
    if n is not None:
        axes[-1].axhline(n, color="0.5", ls=":", lw=0.8)
    axes[-1].set_yscale("log" if returns is not None else "linear")
    axes[-1].set_xlabel("iteration")
    axes[-1].set_ylabel("ESS of the log (episodes)")
    for a in axes:
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def table(J, ess, n, returns=None):
    """The per-iteration table as text."""
    head = f"{'iter':>4} {'true J':>9} {'return -J':>10}" + (f" {'Pendulum-v1':>12}" if returns else "")
    lines = [head + f" {'ESS':>7} {'ESS/n':>6}"]
    for i, (j, e) in enumerate(zip(J, ess, strict=True)):
        g = f" {returns[i]:12.1f}" if returns else ""
        lines.append(f"{i:4d} {j:9.3f} {-j:10.3f}{g} {e:7.1f} {e / n:6.3f}")
    return "\n".join(lines)


def run_pendulum(out=OUT, quick=False, iterations=None, seed=0, verbose=True):
    """The full pendulum experiment: log under a fresh MLP, improve from the log; returns a dict of the results."""
    cfg = dict(PENDULUM_QUICK if quick else PENDULUM)
    if iterations is not None:
        cfg["iterations"] = iterations
    theta_b, static = behaviour_policy(seed)
    problem = pendulum_problem(static, gamma=cfg["gamma"], horizon=cfg["horizon"])
    store = os.path.join(out, "pendulum_log.zarr")
    t0 = time.perf_counter()
    ds = record_rollout_log(problem, theta_b, store, cfg["episodes"], seed)
    if verbose:
        print(f"logged {ds.sizes['episode']} episodes x {cfg['horizon']} steps under the behaviour MLP to {store}")
    theta, J, ess, iterates, hist = improve_from_log(
        problem,
        theta_b,
        ds,
        cfg["iterations"],
        cfg["eval_episodes"],
        verbose,
        epochs=cfg["epochs"],
        minibatch=cfg["minibatch"],
        learning_rate=cfg["learning_rate"],
        clip_eps=cfg["clip_eps"],
        episodes_per_chunk=None,
        metrics={"Pendulum-v1 return": gym_return(static, cfg["gym_episodes"])},
        describe=lambda th: "MLP",
    )
    wall = time.perf_counter() - t0
    returns = hist["Pendulum-v1 return"]
    return dict(
        problem=problem, static=static, ds=ds, store=store, theta=theta, iterates=iterates, J=J, ess=ess,
        returns=returns, n=ds.sizes["episode"], wall_s=wall, config=cfg,
    )  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["pendulum", "lqr"], default="pendulum")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small log, few epochs (also PYDSO_NOTEBOOK_QUICK=1)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    quick = args.quick or quick_mode()
    os.makedirs(args.out, exist_ok=True)
    if args.system == "lqr":
        problem = lqr_problem()
        K_b = jnp.array([[0.3, 0.4]])
        ds = record_log(problem, K_b, os.path.join(args.out, "lqr_log.zarr"))
        iterations = args.iterations if args.iterations is not None else (3 if quick else 6)
        _, J, ess, _ = improve_from_log(problem, K_b, ds, iterations)
        fig = plot_history(J, ess, n=ds.sizes["episode"])
        print(table(J, ess, ds.sizes["episode"]))
    else:
        r = run_pendulum(args.out, quick, args.iterations)
        J, ess, returns = r["J"], r["ess"], r["returns"]
        fig = plot_history(J, ess, returns, n=r["n"])
        fig.suptitle("Pendulum-v1: improvement of a fresh MLP from one log (no new data)")
        fig.tight_layout()
        print(table(J, ess, r["n"], returns))
        print(
            f"true J {J[0]:.2f} -> {J[-1]:.2f} (best {min(J):.2f}); Pendulum-v1 return {returns[0]:.1f} -> "
            f"{returns[-1]:.1f} (best {max(returns):.1f}); ESS {ess[0]:.0f} -> {ess[-1]:.1f} of {r['n']}; "
            f"{r['wall_s']:.1f} s (logging + improvement + evaluation)"
        )
    path = os.path.join(args.out, "offpolicy_from_logs.png")
    fig.savefig(path, dpi=100)
    print(f"saved {path}")
    return J, ess


if __name__ == "__main__":
    main()
