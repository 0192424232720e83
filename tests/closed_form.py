"""Closed-form references for continuous-state tests: the discounted linear-quadratic closed loop.

x' = A x + B u + w,  u = -K x,  w ~ N(0, sigma^2 I) (sigma = 0: a DeterministicMap),  x0 ~ N(0, s0^2 I),
cost x'Qx + u'Ru, discount gamma.
V(x) = x'P x + c with P = Q + K'RK + gamma (A-BK)' P (A-BK) (a discrete Lyapunov equation) and
c = gamma sigma^2 tr(P) / (1 - gamma), so J(K) = s0^2 tr(P) + c. The optimal gain solves the discounted
Riccati equation (scipy.linalg.solve_discrete_are with sqrt(gamma) A, sqrt(gamma) B).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

import pydso


@dataclass(frozen=True)
class LQR:
    A: np.ndarray
    B: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    gamma: float = 0.9
    sigma: float = 0.1
    s0: float = 1.0
    horizon: int = 150

    def problem(self, name="lqr") -> pydso.Problem:
        A, B, Q, R = (jnp.asarray(m) for m in (self.A, self.B, self.Q, self.R))
        d = A.shape[0]

        def mean(x, K):
            return A @ x - B @ (K @ x)

        def cost(x, K):
            u = -K @ x
            return x @ Q @ x + u @ R @ u

        system = pydso.DeterministicMap(mean) if self.sigma == 0 else pydso.GaussianChain(mean, self.sigma)
        return pydso.Problem(
            system,
            cost,
            pydso.Episodic(self.gamma, self.horizon),
            pydso.Normal(jnp.zeros(d), self.s0),
            name=name,
        )

    def value_matrix(self, K):
        A, B, Q, R = (jnp.asarray(m) for m in (self.A, self.B, self.Q, self.R))
        d = A.shape[0]
        acl = A - B @ K
        qk = Q + K.T @ R @ K
        vec_p = jnp.linalg.solve(jnp.eye(d * d) - self.gamma * jnp.kron(acl.T, acl.T), qk.reshape(-1))
        return vec_p.reshape(d, d)

    def objective(self, K):
        P = self.value_matrix(K)
        return self.s0**2 * jnp.trace(P) + self.gamma * self.sigma**2 * jnp.trace(P) / (1 - self.gamma)

    def gradient(self, K):
        return jax.grad(self.objective)(jnp.asarray(K))

    def optimal_gain(self):
        g = self.gamma
        P = scipy.linalg.solve_discrete_are(np.sqrt(g) * self.A, np.sqrt(g) * self.B, self.Q, self.R)
        return g * np.linalg.solve(self.R + g * self.B.T @ P @ self.B, self.B.T @ P @ self.A)


def double_integrator(**kwargs) -> LQR:
    dt = 0.1
    return LQR(
        A=np.array([[1.0, dt], [0.0, 1.0]]),
        B=np.array([[0.0], [dt]]),
        Q=np.eye(2),
        R=np.array([[0.1]]),
        **kwargs,
    )
