"""The state-action chain (DESIGN.md §1.3): exact objective, gradient = policy-gradient theorem, chain Fisher and
natural gradient = Kakade's (computed independently here), the marginal chain's natural gradient differs; and a
continuous (linear-Gaussian) state-action chain against its closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso.problems import state_action_chain

S, A, GAMMA = 5, 3, 0.9


def _mdp(seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(S), size=(S, A))
    c = rng.uniform(0.0, 1.0, size=(S, A))
    p0 = rng.dirichlet(np.ones(S))
    theta = jnp.asarray(rng.normal(size=(S, A)))
    return p, c, p0, theta


def policy(theta):
    return jax.nn.softmax(theta, axis=1)


def _kakade(p, c, p0, theta, gamma):
    """Kakade's F = sum_s rho(s) E_{a~pi}[grad log pi grad log pi^T] and the policy-gradient-theorem gradient,
    with numpy linear algebra and autodiff of log pi only (no pydso code path)."""
    pi = np.asarray(policy(theta))
    P = np.einsum("sa,sat->st", pi, p)
    rho = np.linalg.solve(np.eye(S) - gamma * P.T, p0)
    dlogpi = np.asarray(jax.jacobian(lambda th: jnp.log(policy(th)))(theta)).reshape(S, A, S * A)
    F = np.einsum("s,sa,sap,saq->pq", rho, pi, dlogpi, dlogpi)
    return F, rho


def test_tabular_state_action_chain_is_the_policy_gradient_and_kakade():
    p, c, p0, theta = _mdp()
    chain = state_action_chain(policy, pydso.Episodic(GAMMA), p=p, c=c, p0=p0, theta0=theta)
    marginal = pydso.exact.mdp_problem(policy, p, c, p0, pydso.Episodic(GAMMA))
    # the same objective and the same gradient as the MDP (policy-gradient theorem)
    J = pydso.exact.objective(marginal, theta)
    np.testing.assert_allclose(pydso.exact.objective(chain.problem, theta), J, rtol=1e-12)
    assert chain.result(theta)["objective"] == pytest.approx(float(J), rel=1e-12)
    pgt = pydso.exact.policy_gradient_theorem(policy, p, c, p0, GAMMA, theta)
    np.testing.assert_allclose(pydso.exact.gradient(chain.problem, theta), pgt, rtol=1e-10, atol=1e-12)
    # chain Fisher = Kakade's Fisher; chain natural gradient = Kakade's natural policy gradient
    F_kakade, _ = _kakade(p, c, p0, theta, GAMMA)
    np.testing.assert_allclose(pydso.exact.fisher(chain.problem, theta), F_kakade, rtol=1e-10, atol=1e-12)
    g = np.asarray(pgt).reshape(-1)
    ng_kakade = np.linalg.pinv(F_kakade, hermitian=True) @ g
    ng_chain = np.asarray(pydso.exact.natural_gradient(chain.problem, theta)).reshape(-1)
    np.testing.assert_allclose(ng_chain, ng_kakade, rtol=1e-8, atol=1e-10)
    # the marginal chain's natural gradient is a different direction
    ng_marginal = np.asarray(pydso.exact.natural_gradient(marginal, theta)).reshape(-1)
    rel = np.linalg.norm(ng_marginal - ng_kakade) / np.linalg.norm(ng_kakade)
    print(f"relative difference marginal-chain vs Kakade natural gradient (S={S}, A={A}): {rel:.3g}")
    assert rel > 0.1


def test_tabular_state_action_chain_average_cost():
    p, c, p0, theta = _mdp(1)
    chain = state_action_chain(policy, pydso.AverageCost(), p=p, c=c, p0=p0, theta0=theta)
    marginal = pydso.exact.mdp_problem(policy, p, c, p0, pydso.AverageCost())
    np.testing.assert_allclose(
        pydso.exact.objective(chain.problem, theta), pydso.exact.objective(marginal, theta), rtol=1e-12
    )
    np.testing.assert_allclose(
        pydso.exact.gradient(chain.problem, theta), pydso.exact.gradient(marginal, theta), rtol=1e-9, atol=1e-12
    )
    # Kakade's average-reward Fisher: stationary d(s) in place of rho
    pi = np.asarray(policy(theta))
    d = np.asarray(pydso.exact.stationary(np.einsum("sa,sat->st", pi, p)))
    dlogpi = np.asarray(jax.jacobian(lambda th: jnp.log(policy(th)))(theta)).reshape(S, A, S * A)
    F = np.einsum("s,sa,sap,saq->pq", d, pi, dlogpi, dlogpi)
    np.testing.assert_allclose(pydso.exact.fisher(chain.problem, theta), F, rtol=1e-9, atol=1e-12)


def test_score_gradient_on_the_state_action_chain_is_reinforce():
    """Monte Carlo on the chain (whose score is grad log pi) against the policy-gradient theorem."""
    p, c, p0, theta = _mdp(2)
    gamma = 0.7
    chain = state_action_chain(policy, pydso.Episodic(gamma, 60), p=p, c=c, p0=p0, theta0=theta)
    est = pydso.score_gradient(chain.problem, theta, key=jax.random.key(0), n=2000)
    pgt = np.asarray(pydso.exact.policy_gradient_theorem(policy, p, c, p0, gamma, theta))
    z = np.abs(np.asarray(est.gradient) - pgt) / np.asarray(est.stderr)
    assert np.all(z < 3.5), z  # 15 components


# continuous: x' = a x + b u + sw w, u ~ N(-k x, su^2), cost q x^2 + r u^2, theta = (k, log su), x0 ~ N(0, s0^2)
AA, BB, QQ, RR, SW, S0, H = 0.9, 0.5, 1.0, 0.2, 0.2, 1.0, 25


def _closed_form(th, gamma):
    """sum_{t<T} gamma^t [(q + r k^2) m_t + r su^2], m_t = E x_t^2 (T = H - 1 MDP steps after the start step)."""
    T = H - 1
    k, su2 = th[0], jnp.exp(2.0 * th[1])
    c2 = (AA - BB * k) ** 2
    sig2 = BB**2 * su2 + SW**2

    def geo(z):
        return (1.0 - z**T) / (1.0 - z)

    sum_m = S0**2 * geo(gamma * c2) + sig2 / (1.0 - c2) * (geo(gamma) - geo(gamma * c2))
    return (QQ + RR * k**2) * sum_m + RR * su2 * geo(gamma)


def test_continuous_state_action_chain_matches_closed_form():
    gamma = 0.9

    def gaussian_policy(x, th):
        return -th[0] * x, jnp.exp(th[1])

    chain = state_action_chain(
        gaussian_policy,
        pydso.Episodic(gamma, H),
        dynamics=lambda x, u: AA * x + BB * u,
        noise_scale=SW,
        cost=lambda x, u: jnp.sum(QQ * x**2 + RR * u**2),
        initial=pydso.Normal(jnp.zeros(1), S0),
        action_size=1,
        theta0=jnp.array([0.6, np.log(0.3)]),
    )
    theta = chain.theta0
    est = pydso.score_gradient(chain.problem, theta, key=jax.random.key(0), n=4000)
    ref_J = float(_closed_form(theta, gamma))
    assert abs(float(est.objective) - ref_J) < 3 * float(est.objective_stderr)
    ref_g = np.asarray(jax.grad(_closed_form)(theta, gamma))
    z = np.abs(np.asarray(est.gradient) - ref_g) / np.asarray(est.stderr)
    assert np.all(z < 3.0), (est.gradient, ref_g, z)


def test_state_action_chain_bad_input():
    p, c, p0, theta = _mdp()
    with pytest.raises(pydso.ProblemError, match="c must"):
        state_action_chain(policy, pydso.Episodic(GAMMA), p=p, c=c[:, :2], p0=p0)
    with pytest.raises(pydso.ProblemError, match="policy"):
        state_action_chain(policy, pydso.Episodic(GAMMA), p=p, c=c, p0=p0, theta0=jnp.zeros((S, A + 1)))
    with pytest.raises(pydso.ProblemError, match="needs all"):
        state_action_chain(policy, pydso.Episodic(GAMMA), p=p, c=c)
    with pytest.raises(pydso.ProblemError, match="setting"):
        state_action_chain(policy, pydso.FiniteHorizon(5), p=p, c=c, p0=p0)
