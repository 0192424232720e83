"""Explicit Runge–Kutta tableaux as data: classic RK4 and Kutta's 3/8 rule as diffrax solvers, and the rule for
when pydso's fixed-step fast path computes the same discrete solution as diffrax.

Systems know no solver: whether the fast path applies is decided here, by the backend
(:meth:`pydso.backends.JaxBackend.check`).
"""

from collections.abc import Callable
from typing import ClassVar

import diffrax
import numpy as np
from diffrax import ThirdOrderHermitePolynomialInterpolation

from ..._errors import ProblemError

__all__ = ["RK4", "RK4ThreeEighths", "tableau_of", "fixed_step_applies"]


_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # Crude embedded estimate: RK4 minus the midpoint rule (stage 2); only used by adaptive controllers.
    b_error=np.array([1 / 6, 1 / 3 - 1.0, 1 / 3, 1 / 6]),
    c=np.array([0.5, 0.5, 1.0]),
)

_rk38_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
    # Embedded 2nd-order rule (1/4, 0, 3/4, 0); only used by adaptive controllers.
    b_error=np.array([1 / 8 - 1 / 4, 3 / 8, 3 / 8 - 3 / 4, 1 / 8]),
    c=np.array([1 / 3, 2 / 3, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classic 4th-order Runge–Kutta method (Kutta 1901), as a diffrax solver.

    4 stages, no FSAL; 3rd-order Hermite interpolation for dense output. Meant for fixed steps
    (``diffrax.ConstantStepSize``); its embedded error estimate is only 2nd order.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar[Callable[..., ThirdOrderHermitePolynomialInterpolation]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        del terms
        return 4


class RK4ThreeEighths(diffrax.AbstractERK):
    """Kutta's 3/8 rule (4th order, 4 stages), as a diffrax solver.

    This is the tableau of ``torchdiffeq``'s fixed-grid ``method="rk4"`` (its ``rk4_alt_step_func``), provided so
    that benchmarks can compare like with like.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk38_tableau
    interpolation_cls: ClassVar[Callable[..., ThirdOrderHermitePolynomialInterpolation]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        del terms
        return 4


def tableau_of(solver) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...], tuple[float, ...]]:
    """``(a, b, c)`` of an explicit RK diffrax solver: ``a[i]`` is row ``i`` of the strictly lower triangle
    (``a[0] == ()``), ``b`` the solution weights and ``c`` the nodes (``c[0] == 0``), all Python floats.

    **Raises:** :class:`~pydso.ProblemError` for solvers without a readable explicit tableau (implicit, IMEX,
    SDE-specific, ...).
    """
    if type(solver) is diffrax.Euler:
        return ((),), (1.0,), (0.0,)
    tab = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or not isinstance(tab, diffrax.ButcherTableau):
        raise ProblemError(f"no explicit Butcher tableau for solver {type(solver).__name__}")
    if tab.implicit or tab.c1 != 0.0:
        raise ProblemError(f"solver {type(solver).__name__} is not explicit")
    a = ((),) + tuple(tuple(float(v) for v in row) for row in tab.a_lower)
    b = tuple(float(v) for v in tab.b_sol)
    c = (0.0,) + tuple(float(v) for v in tab.c)
    return a, b, c


def fixed_step_applies(solver, stepsize_controller, adjoint) -> bool:
    """Whether a fixed-step explicit-RK fast path reproduces ``diffrax.diffeqsolve`` with these settings:
    ``diffrax.ConstantStepSize``, an explicit tableau readable by :func:`tableau_of`, and a discretise-then-
    optimise adjoint (``RecursiveCheckpointAdjoint`` or ``DirectAdjoint``, whose gradients reverse mode through
    a scan reproduces)."""
    if type(stepsize_controller) is not diffrax.ConstantStepSize:
        return False
    if not isinstance(adjoint, diffrax.RecursiveCheckpointAdjoint | diffrax.DirectAdjoint):
        return False
    try:
        tableau_of(solver)
    except ProblemError:
        return False
    return True
