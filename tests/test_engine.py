"""Rollouts: reproducibility, chunking, settings' weights, terminal sets, ODE/SDE against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from closed_form import double_integrator

import pydso

KEY = jax.random.key(42)


def test_same_key_same_trajectories_whatever_the_chunk_size():
    problem = double_integrator().problem()
    k = jnp.array([[1.0, 2.0]])
    whole = pydso.rollout(problem, k, key=KEY, n=50)
    chunked = pydso.rollout(problem, k, key=KEY, n=50, chunk_size=16)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = pydso.rollout(problem, k, key=jax.random.key(1), n=50)
    assert not np.allclose(np.asarray(other.states), np.asarray(whole.states))


def test_gaussian_chain_log_probs_are_the_transition_densities():
    problem = double_integrator().problem()
    k = jnp.array([[1.0, 2.0]])
    traj = pydso.rollout(problem, k, key=KEY, n=3)
    lqr = double_integrator()
    x, x_next = np.asarray(traj.states[:, :-1]), np.asarray(traj.states[:, 1:])
    mean = x @ (lqr.A - lqr.B @ np.asarray(k)).T
    expected = (-0.5 * ((x_next - mean) / lqr.sigma) ** 2 - np.log(lqr.sigma) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(np.asarray(traj.log_probs), expected, rtol=1e-10)


def test_objective_and_cost_to_go_use_the_setting_weights():
    problem = double_integrator(gamma=0.8, horizon=7).problem()
    traj = pydso.rollout(problem, jnp.array([[1.0, 1.0]]), key=KEY, n=5)
    w = 0.8 ** np.arange(7)
    costs = np.asarray(traj.costs)
    np.testing.assert_allclose(np.asarray(traj.objective), costs @ w, rtol=1e-12)
    ctg = np.asarray(traj.cost_to_go())
    for t in range(8):
        np.testing.assert_allclose(ctg[:, t], costs[:, t:] @ w[t:], rtol=1e-12, atol=1e-14)


def test_average_cost_weights_with_burn_in():
    setting = pydso.AverageCost(horizon=10, burn_in=4)
    w, w_end = setting.weights()
    np.testing.assert_allclose(w, np.r_[np.zeros(4), np.full(6, 1 / 6)])
    assert w_end == 0.0


def test_terminal_set_absorbs_and_pays_terminal_cost_once():
    # Deterministic walk x' = x + 1 from 0; terminal at x >= 3: costs at x = 0, 1, 2, terminal cost at x = 3.
    problem = pydso.Problem(
        pydso.DeterministicMap(lambda x, th: x + th),
        lambda x, th: 1.0 + x[0],
        pydso.Episodic(0.5, 10, terminal=lambda x: x[0] >= 3),
        pydso.Fixed(jnp.zeros(1)),
        terminal_cost=lambda x, th: 100.0 * x[0],
    )
    traj = pydso.rollout(problem, 1.0, key=KEY, n=1)
    np.testing.assert_array_equal(np.asarray(traj.alive[0]), [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(traj.states[0, :, 0]), [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3])
    expected = 1.0 + 0.5 * 2.0 + 0.25 * 3.0 + 0.125 * 300.0
    np.testing.assert_allclose(float(traj.objective[0]), expected, rtol=1e-14)


def test_ode_cost_integral_matches_closed_form():
    # x' = -a x, L = x^2: x(t) = x0 e^{-a t}, integral over [t_k, t_k + dt] of x0^2 e^{-2 a t}.
    a, dt, horizon, x0 = 0.7, 0.1, 30, 1.3
    problem = pydso.Problem(
        pydso.ODESystem(lambda t, x, a: -a * x, dt=dt),
        lambda x, a: jnp.sum(x**2),
        pydso.FiniteHorizon(horizon),
        pydso.Fixed(jnp.array([x0])),
    )
    traj = pydso.rollout(problem, a, key=KEY, n=1)
    t = dt * np.arange(horizon + 1)
    np.testing.assert_allclose(np.asarray(traj.states[0, :, 0]), x0 * np.exp(-a * t), rtol=1e-6)
    exact = x0**2 * (np.exp(-2 * a * t[:-1]) - np.exp(-2 * a * t[1:])) / (2 * a)
    np.testing.assert_allclose(np.asarray(traj.costs[0]), exact, rtol=1e-6)


def test_sde_ornstein_uhlenbeck_moments():
    # dx = -a x dt + s dW: E x_T = x0 e^{-aT}, Var x_T = s^2 (1 - e^{-2aT}) / (2a) (Euler-Maruyama bias O(dt)).
    a, s, dt, horizon, x0, n = 1.0, 0.5, 0.01, 100, 2.0, 4000
    problem = pydso.Problem(
        pydso.SDESystem(lambda t, x, a: -a * x, lambda t, x, a: s, dt=dt),
        lambda x, a: jnp.sum(x**2),
        pydso.FiniteHorizon(horizon),
        pydso.Fixed(jnp.array([x0])),
    )
    xt = np.asarray(pydso.rollout(problem, a, key=KEY, n=n).states[:, -1, 0])
    T = dt * horizon
    mean, var = x0 * np.exp(-a * T), s**2 * (1 - np.exp(-2 * a * T)) / (2 * a)
    assert abs(xt.mean() - mean) < 4 * np.sqrt(var / n) + 0.02
    assert abs(xt.var() - var) < 4 * var * np.sqrt(2 / n) + 0.01


def test_tabular_chain_visits_match_transition_matrix():
    P = jnp.array([[0.2, 0.8], [0.6, 0.4]])
    problem = pydso.Problem(
        pydso.TabularChain(lambda th: th),
        lambda x, th: jnp.asarray(x, float),
        pydso.Episodic(0.9, 2),
        pydso.Categorical([1.0, 0.0]),
    )
    traj = pydso.rollout(problem, P, key=KEY, n=20000)
    freq = float(np.mean(np.asarray(traj.states[:, 1]) == 1))
    assert abs(freq - 0.8) < 4 * np.sqrt(0.8 * 0.2 / 20000)
    np.testing.assert_allclose(np.asarray(traj.log_probs[:, 0]), np.log(np.where(traj.states[:, 1] == 1, 0.8, 0.2)))


@pytest.mark.parametrize("n,chunk", [(7, 3), (5, 5), (4, 10)])
def test_chunk_sizes_including_ragged_last_chunk(n, chunk):
    problem = double_integrator(horizon=5).problem()
    traj = pydso.rollout(problem, jnp.ones((1, 2)), key=KEY, n=n, chunk_size=chunk)
    assert traj.states.shape == (n, 6, 2) and traj.step_weights.shape == (5,)


def test_checkpointed_pathwise_gradient_equals_plain_gradient():
    problem = double_integrator(horizon=301, gamma=0.99).problem()
    k = jnp.array([[1.0, 2.0]])
    plain = pydso.Pathwise().estimate(problem, k, key=KEY, n=4)
    remat = pydso.Pathwise(checkpoints=17).estimate(problem, k, key=KEY, n=4)  # 301 = 17 * 17 + 12: ragged tail too
    np.testing.assert_allclose(np.asarray(remat.gradient), np.asarray(plain.gradient), rtol=1e-12)


SHARDING_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {tests!r})
import pydso
from closed_form import double_integrator
assert jax.device_count() == 2, jax.devices()
problem = double_integrator(horizon=20).problem()
traj = pydso.rollout(problem, jnp.ones((1, 2)), key=jax.random.key(0), n=8)
assert len(traj.states.sharding.device_set) == 2, traj.states.sharding
np.save({out!r}, np.asarray(traj.states))
"""


def test_rollout_is_sharded_over_devices_and_unchanged(tmp_path):
    import os
    import subprocess
    import sys

    out = str(tmp_path / "states.npy")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = SHARDING_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    single = pydso.rollout(double_integrator(horizon=20).problem(), jnp.ones((1, 2)), key=jax.random.key(0), n=8)
    np.testing.assert_allclose(np.load(out), np.asarray(single.states), rtol=1e-12)


def _lorenz(t, x, th):
    return jnp.array([th[0] * (x[1] - x[0]), x[0] * (th[1] - x[2]) - x[1], x[0] * x[1] - th[2] * x[2]])


DIFFRAX = pydso.backends.JaxBackend(integrator="diffrax")
FASTPATH = pydso.backends.JaxBackend(integrator="fastpath")


def _lorenz_problem(solver, horizon=200):
    return pydso.Problem(
        pydso.ODESystem(_lorenz, dt=0.01, solver=solver),
        lambda x, th: x @ x,
        pydso.FiniteHorizon(horizon),
        pydso.Normal(jnp.ones(3), 1.0),
        terminal_cost=lambda x, th: x[2] + 0.1 * th[0] * x[0],
    )


@pytest.mark.parametrize("solver", ["Tsit5", "RK4ThreeEighths"])
def test_fast_path_is_the_default_and_matches_diffrax_rollout_and_gradient(solver):
    import diffrax

    problem = _lorenz_problem(diffrax.Tsit5() if solver == "Tsit5" else pydso.backends.jax.RK4ThreeEighths())
    from pydso.backends.jax._simulate import choose_integrator

    assert choose_integrator(problem, "auto") == "fastpath"
    theta = jnp.array([10.0, 28.0, 8.0 / 3.0])
    a = pydso.rollout(problem, theta, key=KEY, n=8)
    b = pydso.rollout(problem, theta, key=KEY, n=8, backend=DIFFRAX)
    c = pydso.rollout(problem, theta, key=KEY, n=8, backend=FASTPATH)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    scale = np.max(np.abs(np.asarray(b.states)))
    np.testing.assert_allclose(np.asarray(a.states), np.asarray(b.states), rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(np.asarray(a.costs), np.asarray(b.costs), rtol=1e-11)
    np.testing.assert_allclose(np.asarray(a.terminal_costs), np.asarray(b.terminal_costs), rtol=1e-11)
    np.testing.assert_allclose(np.asarray(a.objective), np.asarray(b.objective), rtol=1e-12)
    # gradients: batch means (3 groups of 3, one of 1) against the diffrax reference per episode (groups >= n)
    ga = pydso.Pathwise(groups=4).estimate(problem, theta, key=KEY, n=10)
    gb = pydso.Pathwise(backend=DIFFRAX, groups=10).estimate(problem, theta, key=KEY, n=10)
    np.testing.assert_allclose(np.asarray(ga.gradient), np.asarray(gb.gradient), rtol=1e-10)
    np.testing.assert_allclose(float(ga.objective), float(gb.objective), rtol=1e-12)
    np.testing.assert_allclose(float(ga.objective_stderr), float(gb.objective_stderr), rtol=1e-10)


def test_pathwise_batch_means_standard_error():
    # Per-episode gradients of the Lorenz objective through diffrax (the reference path), grouped by hand: the
    # estimator's mean is their mean and its stderr the batch-means formula; with groups >= n the usual one.
    import diffrax

    problem = _lorenz_problem(diffrax.Tsit5(), horizon=60)
    theta = jnp.array([10.0, 28.0, 8.0 / 3.0])
    n = 11
    keys = pydso.engine.episode_keys(KEY, n)

    def objective(theta, key):
        traj = pydso.engine.rollout_chunk(problem, theta, key[None], DIFFRAX)
        return traj.objective[0]

    g = np.asarray(jax.vmap(jax.grad(objective), in_axes=(None, 0))(theta, keys))
    est = pydso.Pathwise(groups=4).estimate(problem, theta, key=KEY, n=n)  # m = 3: groups of 3, 3, 3, 2
    means = np.stack([g[0:3].mean(0), g[3:6].mean(0), g[6:9].mean(0), g[9:11].mean(0)])
    frac = np.array([3, 3, 3, 2]) / n
    mean = frac @ means
    se = np.sqrt(4 / 3 * ((frac[:, None] * (means - mean)) ** 2).sum(0))
    np.testing.assert_allclose(np.asarray(est.gradient), g.mean(0), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(est.stderr), se, rtol=1e-8)
    per_episode = pydso.Pathwise(groups=n).estimate(problem, theta, key=KEY, n=n)
    np.testing.assert_allclose(np.asarray(per_episode.stderr), g.std(0, ddof=1) / np.sqrt(n), rtol=1e-8)


def test_pathwise_two_groups_equal_per_episode_gradients():
    # 2 groups of 33 episodes against 66 groups of one (the per-episode estimator).
    problem = _lorenz_problem(pydso.backends.jax.RK4(), horizon=30)
    theta = jnp.array([10.0, 28.0, 8.0 / 3.0])
    seq = pydso.Pathwise(groups=2).estimate(problem, theta, key=KEY, n=66)
    per = pydso.Pathwise(groups=66).estimate(problem, theta, key=KEY, n=66)
    np.testing.assert_allclose(np.asarray(seq.gradient), np.asarray(per.gradient), rtol=1e-10)
    np.testing.assert_allclose(float(seq.objective), float(per.objective), rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(seq.stderr))) and np.all(np.asarray(seq.stderr) > 0)


def test_pathwise_default_groups_follow_the_backend():
    # The default is the backend's choice: per-episode gradients (exact per-episode stderr) where episodes are
    # simulated one by one (chains, diffrax) up to 64 episodes, 32 batch-means groups on the whole-ensemble fast path
    # and for more than 64 episodes.
    chain = double_integrator(horizon=15).problem()
    k = jnp.array([[1.0, 1.5]])
    default = pydso.Pathwise().estimate(chain, k, key=KEY, n=40)
    per_episode = pydso.Pathwise(groups=40).estimate(chain, k, key=KEY, n=40)
    np.testing.assert_array_equal(np.asarray(default.stderr), np.asarray(per_episode.stderr))
    ode = _lorenz_problem(pydso.backends.jax.RK4(), horizon=10)
    backend = pydso.backends.JaxBackend()
    assert backend.gradient_groups(ode, 60) == 32 and backend.gradient_groups(chain, 60) == 60
    assert pydso.backends.JaxBackend(integrator="diffrax").gradient_groups(ode, 64) == 64
    assert backend.gradient_groups(chain, 65) == 32 and backend.gradient_groups(ode, 100) == 32


@pytest.mark.parametrize("kind", ["ode", "sde"])
def test_fast_path_episodes_do_not_depend_on_the_chunk_size(kind):
    # Each episode uses its own key only, so chunking cannot change what is simulated. The arithmetic agrees to
    # rounding, not bitwise: XLA's CPU code generator contracts a*b+c into fused multiply-adds depending on array
    # shapes (measured: bitwise equal with XLA_FLAGS=--xla_cpu_max_isa=AVX, which has no FMA). A key mix-up would
    # show as O(1) differences.
    if kind == "ode":
        problem = _lorenz_problem(pydso.backends.jax.RK4(), horizon=30)
        theta = jnp.array([10.0, 28.0, 8.0 / 3.0])
    else:
        problem = pydso.Problem(
            pydso.SDESystem(lambda t, x, th: -th * x, lambda t, x, th: 0.3 + 0.1 * x**2, dt=0.01),
            lambda x, th: x @ x,
            pydso.FiniteHorizon(30),
            pydso.Normal(jnp.ones(3), 1.0),
            terminal_cost=lambda x, th: x[0],
        )
        theta = 1.3
    whole = pydso.rollout(problem, theta, key=KEY, n=37)
    for chunk in (1, 8, 16):
        chunked = pydso.rollout(problem, theta, key=KEY, n=37, chunk_size=chunk)
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
            a, b = np.asarray(a, float), np.asarray(b, float)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * max(1.0, np.max(np.abs(b))))


@pytest.mark.parametrize("backend", [None, DIFFRAX])
def test_diverging_ode_raises_and_names_the_episode(backend):
    # x' = x^2 from x0 = a blows up at t = 1/a: only the episodes starting above 1/T = 1 diverge.
    problem = pydso.Problem(
        pydso.ODESystem(lambda t, x, th: x**2, dt=0.01, solver=pydso.backends.jax.RK4()),
        lambda x, th: jnp.sum(x),
        pydso.FiniteHorizon(100),
        pydso.Empirical(jnp.array([[0.5], [0.6], [3.0], [0.2]])),
    )
    traj = pydso.rollout(problem, 0.0, key=KEY, n=6, check=False, backend=backend)
    finite = np.isfinite(np.asarray(traj.states)).all(axis=(1, 2))
    assert not finite.all() and finite.any()
    first = int(np.argmin(finite))
    with pytest.raises(pydso.DivergenceError, match=f"non-finite state in episode {first} "):
        pydso.rollout(problem, 0.0, key=KEY, n=6, backend=backend)


def test_fast_path_does_not_apply_to_adaptive_solves():
    import diffrax

    problem = pydso.Problem(
        pydso.ODESystem(_lorenz, dt=0.01, stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8)),
        lambda x, th: x @ x,
        pydso.FiniteHorizon(5),
        pydso.Fixed(jnp.ones(3)),
    )
    from pydso.backends.jax._simulate import choose_integrator

    assert choose_integrator(problem, "auto") == "diffrax"
    with pytest.raises(pydso.ProblemError, match="integrator='fastpath'.*needs diffrax.ConstantStepSize"):
        pydso.rollout(problem, jnp.array([10.0, 28.0, 8.0 / 3.0]), key=KEY, n=2, backend=FASTPATH)
    with pytest.raises(pydso.ProblemError, match="integrator must be one of"):
        pydso.backends.JaxBackend(integrator="rk4")


def test_rollout_streams_chunks_to_a_store(tmp_path):
    problem = double_integrator(horizon=12).problem(name="di")
    k = jnp.array([[1.0, 2.0]])
    path = tmp_path / "log.zarr"
    ds = pydso.rollout(problem, k, key=KEY, n=10, chunk_size=4, record=path)
    reference = pydso.rollout(problem, k, key=KEY, n=10)
    assert ds.sizes["episode"] == 10 and ds["state"].chunks is not None  # lazy, dask-backed
    np.testing.assert_array_equal(ds["state"].values, np.asarray(reference.states))
    np.testing.assert_allclose(ds["behavior_logp"].values[:, :-1], np.asarray(reference.log_probs), rtol=1e-12)
    # Recording again appends to the same store.
    again = pydso.rollout(problem, k, key=jax.random.key(5), n=3, record=path)
    assert again.sizes["episode"] == 13


def test_diverging_chunk_is_not_recorded(tmp_path):
    problem = pydso.Problem(
        pydso.GaussianChain(lambda x, th: th * x**3, 0.1),
        lambda x, th: jnp.sum(x),
        pydso.Episodic(1.0, 30),
        pydso.Fixed(jnp.full(1, 1.0)),
    )
    path = tmp_path / "log.zarr"
    with pytest.raises(pydso.DivergenceError):
        pydso.rollout(problem, 3.0, key=KEY, n=4, chunk_size=2, record=path)
    assert not path.exists()


def test_sde_fast_path_equals_diffrax_euler_maruyama_on_the_same_increments():
    import diffrax
    import lineax

    a, s, dt, horizon = 1.3, 0.4, 0.02, 50
    drift = lambda t, x, th: -th * x + jnp.sin(t)
    diffusion = lambda t, x, th: s * (1.0 + 0.1 * x**2)
    problem = pydso.Problem(
        pydso.SDESystem(drift, diffusion, dt=dt),
        lambda x, th: x @ x,
        pydso.FiniteHorizon(horizon),
        pydso.Normal(jnp.ones(2), 0.5),
    )
    traj = pydso.rollout(problem, a, key=KEY, n=3, backend=FASTPATH)
    # Rebuild each episode's increments exactly as the fast path draws them, and drive diffrax's Euler
    # (Euler-Maruyama) with them through a piecewise-linear Brownian path.
    ts = dt * jnp.arange(horizon + 1, dtype=float)
    for i, key in enumerate(pydso.engine.episode_keys(KEY, 3)):
        key0, key_bm = jax.random.split(key)
        x0 = problem.initial.sample(key0)
        dw = jnp.sqrt(dt) * jnp.stack([jax.random.normal(jax.random.fold_in(key_bm, n), (2,)) for n in range(horizon)])
        path = diffrax.LinearInterpolation(ts, jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(dw, axis=0)]))
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, x, th: drift(t, x, th)),
            diffrax.ControlTerm(lambda t, x, th: lineax.DiagonalLinearOperator(diffusion(t, x, th)), path),
        )
        sol = diffrax.diffeqsolve(
            terms, diffrax.Euler(), 0.0, horizon * dt, dt, x0, args=a, saveat=diffrax.SaveAt(ts=ts)
        )
        np.testing.assert_allclose(np.asarray(traj.states[i]), np.asarray(sol.ys), rtol=1e-12, atol=1e-13)
        # costs: left-point rule L(x_k) dt; log-densities: the Euler-Maruyama transition density
        np.testing.assert_allclose(
            np.asarray(traj.costs[i]), np.sum(np.asarray(sol.ys[:-1]) ** 2, axis=-1) * dt, rtol=1e-12
        )
        lp = problem.system.path_log_prob(sol.ys, a)
        np.testing.assert_allclose(np.asarray(traj.log_probs[i]), np.asarray(lp), rtol=1e-10)
    reference = pydso.rollout(problem, a, key=KEY, n=3, backend=DIFFRAX)
    assert reference.states.shape == traj.states.shape
    assert np.all(np.isfinite(np.asarray(reference.log_probs)))


def test_recording_is_all_or_nothing_when_a_later_chunk_diverges(tmp_path):
    # x' = x^3 + noise from x0 ~ U[0, 1.3]: episodes starting above ~1 blow up. Choose the chunk size so that
    # the first chunk is finite and a later one diverges.
    problem = pydso.Problem(
        pydso.GaussianChain(lambda x, th: th * x**3, 1e-3),
        lambda x, th: jnp.sum(x**2),
        pydso.Episodic(1.0, 40),
        pydso.Uniform([0.0], [2.0]),
    )
    for seed in range(20):  # deterministic search for a key whose first episode is fine but not all are
        key = jax.random.key(seed)
        free = pydso.rollout(problem, 1.0, key=key, n=12, check=False)
        finite = np.isfinite(np.asarray(free.states)).all(axis=(1, 2))
        if finite[0] and not finite.all():
            break
    first_bad = int(np.argmin(finite))
    assert not finite.all() and first_bad > 0, finite
    path = tmp_path / "log.zarr"
    pydso.rollout(problem, 0.1, key=jax.random.key(99), n=2, record=path)  # an existing store with 2 good episodes
    before = pydso.data.open(path)["state"].values
    with pytest.raises(pydso.DivergenceError):
        pydso.rollout(problem, 1.0, key=key, n=12, chunk_size=first_bad, record=path)
    after = pydso.data.open(path)
    np.testing.assert_array_equal(after["state"].values, before)
    assert [p.name for p in tmp_path.iterdir()] == ["log.zarr"]  # no staging left behind


def _ou_sde_problem():
    return pydso.Problem(
        pydso.SDESystem(lambda t, x, th: -th * x, lambda t, x, th: 0.3, dt=0.05),
        lambda x, th: x @ x,
        pydso.Episodic(0.95, 40),
        pydso.Normal(jnp.ones(2), 0.5),
    )


@pytest.mark.parametrize("kind", ["ode_fastpath", "ode_diffrax", "sde", "chain_with_exit"])
def test_save_costs_keeps_everything_but_the_states(kind):
    import diffrax

    if kind.startswith("ode"):
        problem, theta = _lorenz_problem(diffrax.Tsit5(), horizon=50), jnp.array([10.0, 28.0, 8.0 / 3.0])
    elif kind == "sde":
        problem, theta = _ou_sde_problem(), jnp.asarray(1.5)
    else:
        problem = pydso.Problem(
            pydso.GaussianChain(lambda x, th: x + th, 0.3),
            lambda x, th: 1.0 + x[0] ** 2,
            pydso.Episodic(0.9, 30, terminal=lambda x: x[0] >= 2.0),
            pydso.Normal(jnp.zeros(1), 0.2),
            terminal_cost=lambda x, th: 5.0 * x[0],
        )
        theta = jnp.asarray(0.2)
    backend = DIFFRAX if kind == "ode_diffrax" else None
    full = pydso.rollout(problem, theta, key=KEY, n=7, backend=backend)
    for check in (True, False):
        lean = pydso.rollout(problem, theta, key=KEY, n=7, backend=backend, save="costs", check=check, chunk_size=3)
        assert lean.states is None and lean.n_episodes == 7
        for name in ("costs", "terminal_costs", "log_probs", "alive", "terminal_weights", "objective"):
            a, b = np.asarray(getattr(full, name)), np.asarray(getattr(lean, name))
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-300, err_msg=name)
    if kind == "chain_with_exit":
        assert not np.asarray(full.alive).all()  # the exit really happened


def test_save_costs_still_names_the_diverging_episode_and_step():
    problem = pydso.Problem(
        pydso.ODESystem(lambda t, x, th: x**2, dt=0.01, solver=pydso.backends.jax.RK4()),
        lambda x, th: jnp.sum(x),
        pydso.FiniteHorizon(100),
        pydso.Empirical(jnp.array([[0.5], [0.6], [3.0], [0.2]])),
    )
    with pytest.raises(pydso.DivergenceError) as full:
        pydso.rollout(problem, 0.0, key=KEY, n=6)
    with pytest.raises(pydso.DivergenceError) as lean:
        pydso.rollout(problem, 0.0, key=KEY, n=6, save="costs", chunk_size=4)
    assert str(lean.value).split(" (")[0] == str(full.value).split(" (")[0]
    assert "at step" in str(lean.value)


def test_save_rejects_unknown_values_and_record(tmp_path):
    problem = double_integrator().problem()
    with pytest.raises(pydso.ProblemError, match="save must be one of"):
        pydso.rollout(problem, jnp.ones((1, 2)), key=KEY, n=2, save="states")
    with pytest.raises(pydso.ProblemError, match="save='costs' drops the states"):
        pydso.rollout(problem, jnp.ones((1, 2)), key=KEY, n=2, save="costs", record=tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
