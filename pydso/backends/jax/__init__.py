r"""The default backend: compiled JAX (diffrax, the struct-of-arrays fast path, one checkpointed scan).

Besides :class:`JaxBackend`, the fast-path kernels are public for users who want an ensemble integrator without a
:class:`~pydso.Problem` (system identification, benchmarks): :func:`fixed_step_ensemble` (explicit Runge–Kutta,
optional running cost and driving inputs), :func:`euler_maruyama_ensemble`, the tableaux :class:`RK4` and
:class:`RK4ThreeEighths`, :func:`tableau_of` and :func:`fixed_step_applies`.
"""

import equinox as eqx

from ..._errors import ProblemError
from .._base import AbstractBackend, EpisodeBatch, register_backend
from ._fastpath import alias_pad as alias_pad
from ._fastpath import euler_maruyama_ensemble as euler_maruyama_ensemble
from ._fastpath import fixed_step_ensemble as fixed_step_ensemble
from ._simulate import INTEGRATORS, choose_integrator, simulate_batch
from ._solvers import RK4 as RK4
from ._solvers import RK4ThreeEighths as RK4ThreeEighths
from ._solvers import fixed_step_applies as fixed_step_applies
from ._solvers import tableau_of as tableau_of

__all__ = [
    "JaxBackend",
    "RK4",
    "RK4ThreeEighths",
    "fixed_step_ensemble",
    "euler_maruyama_ensemble",
    "tableau_of",
    "fixed_step_applies",
]


class JaxBackend(AbstractBackend):
    r"""Compiled JAX simulation of a chunk of episodes.

    ``integrator`` chooses how ODE and SDE systems are integrated:

    - ``"auto"`` (default): the *fast path* wherever it computes the same discrete solution as diffrax — an
      :class:`~pydso.ODESystem` with ``diffrax.ConstantStepSize``, an explicit Runge–Kutta tableau and a
      discretise-then-optimise adjoint (``RecursiveCheckpointAdjoint``/``DirectAdjoint``), or an
      :class:`~pydso.SDESystem` with ``diffrax.Euler`` (Euler–Maruyama), with a floating-point vector state — and
      :func:`diffrax.diffeqsolve` otherwise. The fast path runs the whole chunk of ``n`` episodes as one
      struct-of-arrays kernel (state ``(d, n)``, one ``lax.scan`` over time, costs integrated inside):
      :func:`fixed_step_ensemble` / :func:`euler_maruyama_ensemble`.
    - ``"fastpath"``: the fast path, or a :class:`~pydso.ProblemError` from :meth:`check` where it does not apply.
    - ``"diffrax"``: the reference path, ``jax.vmap`` over episodes of :func:`diffrax.diffeqsolve` with the system's
      solver, step-size controller and adjoint (SDEs on a ``diffrax.VirtualBrownianTree``).

    Both paths give the same ODE states, costs and gradients to rounding (``tests/test_backends.py``). For SDEs they
    run the same Euler–Maruyama scheme on different Brownian increments (the fast path draws
    ``normal(fold_in(k_i, step), (d,))`` from episode ``i``'s key), so they agree in distribution. Discrete-time
    chains always run as a scan over time, vmapped over episodes.

    **Arguments:**

    - `integrator`: ``"auto"``, ``"fastpath"`` or ``"diffrax"``.

    Use ``integrator="diffrax"`` to cross-check a fast-path result or for the diffrax features the fast path lacks
    (adaptive steps, implicit solvers, continuous adjoints, dense output).
    """

    integrator: str = eqx.field(static=True, default="auto")
    name = "jax"

    def __check_init__(self):
        if self.integrator not in INTEGRATORS:
            raise ProblemError(f"JaxBackend.integrator must be one of {INTEGRATORS}, got {self.integrator!r}")

    def check(self, problem) -> None:
        """Raise :class:`~pydso.ProblemError` if ``integrator="fastpath"`` was asked for and does not apply."""
        choose_integrator(problem, self.integrator)

    def gradient_groups(self, problem, n: int) -> int:
        """32 groups on the fast path (each group one struct-of-arrays kernel). Chains and diffrax solves are
        vmapped per episode anyway: up to 64 episodes one group per episode is the fastest (measured on the pendulum
        demo, 64 episodes: gradient/rollout time 6.1 with 64 groups, 9.8 with 32), beyond that 32 groups (4096
        episodes of the demo's MLP: 4.2 s instead of 6.4 s with per-episode gradients, which materialise an
        ``n x p`` array of per-episode gradients)."""
        if choose_integrator(problem, self.integrator) == "fastpath" or n > 64:
            return min(n, 32)
        return n

    def group_size(self, problem, m: int, groups: int) -> int:
        """One padded episode per group when the vmapped kernels' width ``groups * m`` would alias in cache (see
        :func:`~pydso.backends.jax.alias_pad`: measured 2.6x slower gradients)."""
        return m + 1 if m > 1 and alias_pad(groups * m) else m

    def simulate(self, problem, theta, keys, *, checkpoints=None) -> EpisodeBatch:
        """See :meth:`pydso.backends.AbstractBackend.simulate`; ``checkpoints`` segments the time scan of chains
        and of the fast path (rematerialised in reverse mode), the diffrax path uses the system's adjoint."""
        return simulate_batch(problem, theta, keys, integrator=self.integrator, checkpoints=checkpoints)


register_backend("jax", JaxBackend)
