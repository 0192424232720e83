"""Off-policy improvement from logs: record an LQR closed loop under a poor gain to zarr, then improve the gain
from the stored log alone (proximal surrogate with per-decision IS), plotting J and ESS per iteration.

x' = A x + B u + w, u = -K x (a double integrator). The true J of each gain is evaluated by fresh rollouts
(only for the plot; the learning itself never simulates).
"""

import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import pydso  # noqa: E402
from pydso import data as pdata  # noqa: E402
from pydso import offpolicy, proximal  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


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
    """Roll out ``episodes`` closed-loop episodes under the behaviour gain ``K_b``, save them as a pydso store at
    ``store`` (overwriting) and return the store opened lazily."""
    traj = pydso.rollout(problem, K_b, jax.random.key(seed), episodes)
    pdata.save(pdata.to_dataset(traj, problem, K_b), store, overwrite=True)
    return pdata.open(store)


def improve_from_log(problem, K0, ds, iterations=6, eval_episodes=2000, verbose=True):
    """Improve the gain from the log ``ds`` alone, ``iterations`` proximal steps from ``K0``.

    Returns ``(K, J, ess, gains)``: the final gain, the true J (fresh rollouts, for the plot only) and the episode ESS
    of the log reweighted to each iterate (``iterations + 1`` entries), and the list of iterates.
    """
    K, J, ess, gains = K0, [], [], [K0]
    for it in range(iterations + 1):
        J.append(float(jnp.mean(pydso.rollout(problem, K, jax.random.key(100 + it), eval_episodes).objective)))
        ess.append(offpolicy.ess_report(problem, K, ds, warn_below=None)["episode"])
        if verbose:
            print(f"iteration {it}: K = {K.ravel()}, J = {J[-1]:.3f}, ESS = {ess[-1]:.0f} / {ds.sizes['episode']}")
        if it < iterations:
            K, _ = proximal.improve(
                problem,
                K,
                ds,
                epochs=15,
                minibatch=250,
                optimizer=optax.adam(0.03),
                key=jax.random.key(it),
                episodes_per_chunk=500,
            )
            gains.append(K)
    return K, J, ess, gains


def plot_history(J, ess):
    """Figure of the true J and the ESS of the log per iteration."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(J, "o-")
    a1.set_xlabel("iteration")
    a1.set_ylabel("true J (fresh rollouts)")
    a2.plot(ess, "o-")
    a2.set_xlabel("iteration")
    a2.set_ylabel("ESS of the log")
    fig.tight_layout()
    return fig


def main(iterations=6):
    os.makedirs(OUT, exist_ok=True)
    problem = lqr_problem()
    K_b = jnp.array([[0.3, 0.4]])
    ds = record_log(problem, K_b, os.path.join(OUT, "lqr_log.zarr"))
    K, J, ess, _ = improve_from_log(problem, K_b, ds, iterations)
    fig = plot_history(J, ess)
    fig.savefig(os.path.join(OUT, "offpolicy_from_logs.png"), dpi=100)
    return J, ess


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
