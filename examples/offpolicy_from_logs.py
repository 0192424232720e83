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


def main(iterations=6):
    os.makedirs(OUT, exist_ok=True)
    problem = lqr_problem()
    K_b = jnp.array([[0.3, 0.4]])
    store = os.path.join(OUT, "lqr_log.zarr")
    traj = pydso.rollout(problem, K_b, jax.random.key(0), 1000)
    pdata.save(pdata.to_dataset(traj, problem, K_b), store, overwrite=True)
    ds = pdata.open(store)
    K, J, ess = K_b, [], []
    for it in range(iterations + 1):
        J.append(float(jnp.mean(pydso.rollout(problem, K, jax.random.key(100 + it), 2000).objective)))
        ess.append(offpolicy.ess_report(problem, K, ds, warn_below=None)["episode"])
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
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(J, "o-")
    a1.set_xlabel("iteration")
    a1.set_ylabel("true J (fresh rollouts)")
    a2.plot(ess, "o-")
    a2.set_xlabel("iteration")
    a2.set_ylabel("ESS of the log")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "offpolicy_from_logs.png"), dpi=100)
    return J, ess


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
