"""Approximate policy iteration (pydso.PolicyIteration) and the `pydso improve` command line."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pydso
from pydso import exact

S_MDP, A_MDP, GAMMA = 4, 2, 0.8


def mdp():
    key = jax.random.key(42)
    k1, k2, k3 = jax.random.split(key, 3)
    p = jax.random.dirichlet(k1, jnp.ones(S_MDP), (S_MDP, A_MDP))
    c = jax.random.uniform(k2, (S_MDP, A_MDP), minval=0.0, maxval=2.0)
    p0 = jax.random.dirichlet(k3, 2 * jnp.ones(S_MDP))
    return p, c, p0


def test_api_reaches_the_brute_force_optimum_of_an_mdp():
    p, c, p0 = mdp()
    setting = pydso.Episodic(GAMMA, 30)
    # brute force over the A^S deterministic policies
    best = np.inf
    for actions in itertools.product(range(A_MDP), repeat=S_MDP):
        pol = jax.nn.one_hot(jnp.array(actions), A_MDP)
        best = min(best, float(exact.objective(exact.mdp_problem(lambda th, pol=pol: pol, p, c, p0, setting), None)))
    problem = exact.mdp_problem(lambda th: jax.nn.softmax(th, axis=1), p, c, p0, setting)
    theta0 = jnp.zeros((S_MDP, A_MDP))
    worst = float(exact.objective(problem, theta0))
    method = pydso.PolicyIteration(
        features=lambda x: jax.nn.one_hot(x, S_MDP), n=150, epochs=200, optimizer=optax.adam(0.3)
    )
    result = pydso.minimize(problem, theta0, key=jax.random.key(0), steps=4, method=method)
    hist = result.history
    J = float(exact.objective(problem, result.theta))
    assert J - best < 0.01 * (worst - best), (J, best, worst)
    assert hist["episodes"][-1] == 4 * 150  # data reused across iterations
    assert result.state.n_episodes == 4 * 150
    assert np.all(hist["ess"] <= hist["episodes"] + 1e-9)


def lqr_factory():
    from closed_form import double_integrator

    return double_integrator(horizon=40).problem(), jnp.zeros((1, 2))


def test_cli_improve_from_stored_lqr_log(tmp_path, capsys):
    from closed_form import double_integrator

    from pydso import cli
    from pydso import data as pdata

    lqr = double_integrator(horizon=40)
    problem = lqr.problem()
    K_b = jnp.array([[0.3, 0.4]])
    traj = pydso.rollout(problem, K_b, key=jax.random.key(0), n=500)
    pdata.save(pdata.to_dataset(traj, problem, K_b), tmp_path / "log.zarr")
    np.savez(tmp_path / "theta.npz", np.asarray(K_b))
    out = tmp_path / "new.npz"
    argv = [
        "improve",
        "--data",
        str(tmp_path / "log.zarr"),
        "--problem",
        "test_policy_iteration:lqr_factory",
        "--theta",
        str(tmp_path / "theta.npz"),
        "--method",
        "proximal",
        "--out",
        str(out),
        "--iterations",
        "30",
        "--learning-rate",
        "0.03",
        "--minibatch",
        "125",
    ]
    assert cli.main(argv) == 0
    K = jnp.asarray(np.load(out)["arr_0"])
    assert float(lqr.objective(K)) < float(lqr.objective(K_b))
    assert "ESS" in capsys.readouterr().out
    # clear errors on bad input
    assert cli.main([*argv[:5], "--theta", str(tmp_path / "missing.npz"), *argv[7:]]) == 2
    np.savez(tmp_path / "bad.npz", np.zeros(3))
    assert cli.main([*argv[:5], "--theta", str(tmp_path / "bad.npz"), *argv[7:]]) == 2
    assert "shape" in capsys.readouterr().err


@pytest.mark.parametrize("method, iterations, rate", [("natural", "3", "0.1"), ("api", "2", "0.03")])
def test_cli_improve_natural_and_api_from_stored_lqr_log(tmp_path, capsys, method, iterations, rate):
    from closed_form import double_integrator

    from pydso import cli
    from pydso import data as pdata

    lqr = double_integrator(horizon=40)
    problem = lqr.problem()
    K_b = jnp.array([[0.3, 0.4]])
    traj = pydso.rollout(problem, K_b, key=jax.random.key(1), n=400)
    pdata.save(pdata.to_dataset(traj, problem, K_b), tmp_path / "log.zarr")
    np.savez(tmp_path / "theta.npz", np.asarray(K_b))
    out = tmp_path / "new.npz"
    argv = ["improve", "--data", str(tmp_path / "log.zarr"), "--problem", "test_policy_iteration:lqr_factory"]
    argv += ["--theta", str(tmp_path / "theta.npz"), "--method", method, "--out", str(out)]
    argv += ["--iterations", iterations, "--learning-rate", rate]
    assert cli.main(argv) == 0
    K = jnp.asarray(np.load(out)["arr_0"])
    assert float(lqr.objective(K)) < float(lqr.objective(K_b))
    assert f"pydso improve: {method}" in capsys.readouterr().out
