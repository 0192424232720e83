r"""Gauss–Newton and Levenberg–Marquardt: methods of :func:`pydso.minimize` for least-squares problems.

A least-squares problem (:class:`~pydso.optimize.AbstractLeastSquares`: system identification, ...) has the
objective :math:`J(\theta) = \tfrac12\|r(\theta)\|^2` with a residual vector :math:`r:\mathbb R^p\to\mathbb R^m`
(``theta`` any pytree of float arrays, flattened to :math:`\mathbb R^p` here). With the Jacobian
:math:`\mathbf J = \partial r / \partial\theta` both methods solve a linear least-squares problem per step:

* **Gauss–Newton**: :math:`\delta = \arg\min_\delta \|r + \mathbf J\delta\|`, i.e.
  :math:`\mathbf J^\top\mathbf J\,\delta = -\mathbf J^\top r`; full steps. Fast near a zero-residual optimum,
  unsafe far from it.
* **Levenberg–Marquardt** (Levenberg 1944; Marquardt 1963): :math:`(\mathbf J^\top\mathbf J + \lambda I)\,\delta
  = -\mathbf J^\top r` with the damping :math:`\lambda` adapted by a trust region on the ratio of actual to
  predicted reduction (Moré 1978, *The Levenberg–Marquardt algorithm: implementation and theory*). The robust
  default for nonlinear fits.

The steps themselves are optimistix's (:class:`optimistix.LevenbergMarquardt`, :class:`optimistix.GaussNewton`,
driven through their public ``init``/``step``/``terminate``): there is one implementation, used both by
:func:`pydso.minimize` (one step per call, checkpointable) and by :func:`solve_least_squares` (the whole solve
in one compiled ``while_loop``, which :meth:`pydso.problems.sysid.SysIdProblem.fit` uses).

**Scaling.** The damping :math:`\lambda I` is not invariant to rescaling the parameters, and physical parameters
differ by orders of magnitude. With ``scale=True`` (the Levenberg–Marquardt default) the iteration runs on
:math:`w = \theta / s` with the column scale :math:`s_i = 1 / \|\mathbf J_{:,i}(\theta_0)\|` fixed at the start
point (Marquardt's diagonal scaling, fixed rather than updated so that the trust region does not move; Moré 1978,
§5). The scaled iterate :math:`w` is kept in the state, so the iteration never suffers the rounding of
:math:`\theta \to w`, and a resumed run reproduces an uninterrupted one bit for bit.

**Compilation and batches.** :func:`solve_least_squares` compiles once per method type, problem structure and
shapes: ``max_steps`` and the tolerances ``rtol``/``atol`` are passed as traced values, so changing them never
recompiles. :func:`solve_least_squares_batch` solves from many starts (multi-start) and
:func:`solve_least_squares_many` many stacked problems of one structure, each as one ``jax.vmap``-ed solve. Every
solution reports optimistix's result by its public name (:data:`RESULT_NAMES`), the final cost and the scale-free
optimality measure :func:`gradient_cosine`.

**State.** The method state is optimistix's solver state with its array leaves only (its static parts — traced
linearisations — are rebuilt by tracing in every step) plus the scale vector: a pytree of arrays, as
:func:`pydso.minimize` checkpoints it. It holds the linearisation of :math:`r` at the current point, i.e. memory
of the order of one forward-mode pass through the residual function.

**When not to use them.** For stochastic objectives (Monte-Carlo estimates of :math:`J`): use the gradient
methods of :func:`pydso.minimize`. For objectives that are not a sum of squares (a Gaussian likelihood with an
estimated noise level): use BFGS (:func:`optimistix.minimise`). For :math:`p` in the tens of thousands: the
dense :math:`m\times p` Jacobian (forward mode, :math:`p` passes) dominates; use a gradient method.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from jax.flatten_util import ravel_pytree

from .._checks import check_finite_tree, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ._base import AbstractLeastSquares, AbstractMethod, StepStats

__all__ = [
    "AbstractGaussNewtonMethod",
    "GaussNewton",
    "LevenbergMarquardt",
    "LeastSquaresSolution",
    "solve_least_squares",
    "solve_least_squares_batch",
    "solve_least_squares_many",
    "RESULT_NAMES",
    "RESULT_MESSAGES",
    "result_code",
    "result_message",
    "gradient_cosine",
]

RESULT_NAMES = (
    "successful",
    "max_steps_reached",
    "singular",
    "breakdown",
    "stagnation",
    "conlim",
    "nonfinite_input",
    "nonlinear_max_steps_reached",
    "nonlinear_divergence",
    "nonfinite",
)
"""The public names of :class:`optimistix.RESULTS` (which extends :class:`lineax.RESULTS`); a result code of this
module is the index of its name here (0 successful, 1 max_steps_reached, 2 singular: a non-finite linear solve,
...)."""
SUCCESSFUL, MAX_STEPS_REACHED = 0, 1
FAILED = RESULT_NAMES.index("nonlinear_divergence")
RESULT_MESSAGES = {
    SUCCESSFUL: "successful",
    MAX_STEPS_REACHED: "max_steps reached",
    **{
        i: f"{name} (optimistix.RESULTS.{name}: {optx.RESULTS[getattr(optx.RESULTS, name)].splitlines()[0]})"
        for i, name in enumerate(RESULT_NAMES)
        if i > MAX_STEPS_REACHED
    },
}
"""Human-readable message per result code: the optimistix result name and the first line of its message."""


def result_code(result) -> jax.Array:
    """The integer code (index in :data:`RESULT_NAMES`) of an :class:`optimistix.RESULTS` value (traceable; only
    the public comparison of result values is used)."""
    code = jnp.asarray(len(RESULT_NAMES))  # unknown
    for i, name in reversed(list(enumerate(RESULT_NAMES))):
        code = jnp.where(result == getattr(optx.RESULTS, name), i, code)
    return code


def result_message(code: int) -> str:
    """The message of a result code of :func:`result_code` (``'successful'``, ``'max_steps reached'`` or the
    optimistix result name with its explanation)."""
    return RESULT_MESSAGES.get(int(code), f"unknown optimistix result (code {int(code)})")


class LeastSquaresState(eqx.Module):
    """State of a Gauss–Newton-type method: ``inner`` (the optimistix solver state, array leaves only),
    ``scale`` (the fixed column scale of the flattened ``theta``) and ``w`` (the scaled iterate, ``theta / scale``
    without rounding: used when ``theta`` is the one the previous step returned)."""

    inner: PyTree
    scale: jax.Array
    w: jax.Array


def _is_struct(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


class AbstractGaussNewtonMethod(AbstractMethod):
    r"""A Gauss–Newton-type step of :func:`pydso.minimize` for an
    :class:`~pydso.optimize.AbstractLeastSquares` problem, carried out by an optimistix least-squares solver.

    Subclasses provide :meth:`solver` and the fields ``rtol``, ``atol``, ``scale`` and ``jac``.
    """

    rtol: eqx.AbstractVar[float]
    atol: eqx.AbstractVar[float]
    scale: eqx.AbstractVar[bool]
    jac: eqx.AbstractVar[str]

    def __check_init__(self):
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float | np.floating) or not v >= 0:
                raise ProblemError(f"{type(self).__name__}.{name} must be a non-negative float, got {v!r}")
        if self.jac not in ("fwd", "bwd"):
            raise ProblemError(f"{type(self).__name__}.jac must be 'fwd' or 'bwd', got {self.jac!r}")
        if not isinstance(self.scale, bool):
            raise ProblemError(f"{type(self).__name__}.scale must be True or False, got {self.scale!r}")

    @abc.abstractmethod
    def solver(self) -> optx.AbstractLeastSquaresSolver:
        """The optimistix solver that takes the steps."""

    # ---- the residual function on the scaled flat vector, as optimistix calls it
    @staticmethod
    def _fn(w, args):
        problem, unravel, scale = args
        return problem.residuals(unravel(w * scale)), None

    def _options(self) -> dict:
        return {"jac": self.jac}

    def _inner_static(self, solver, w, args):
        """The non-array parts of the solver state (traced linearisations), rebuilt by abstract evaluation."""
        f_struct, aux_struct = eqx.filter_eval_shape(self._fn, w, args)
        shapes = eqx.filter_eval_shape(
            solver.init, self._fn, w, args, self._options(), f_struct, aux_struct, frozenset()
        )
        return eqx.filter(shapes, lambda x: not _is_struct(x))

    # ---- AbstractMethod
    def check_arguments(self, problem, theta: PyTree) -> None:
        """The checks of :meth:`check` that need no tracing: the problem's type and float leaves of ``theta``."""
        if not isinstance(problem, AbstractLeastSquares):
            raise ProblemError(
                f"{type(self).__name__} needs a least-squares problem (pydso.optimize.AbstractLeastSquares with "
                f"residuals(theta), e.g. pydso.problems.sysid.sysid(...)), got {type(problem).__name__}; for a "
                "pydso.Problem use a gradient method of pydso.minimize"
            )
        check_finite_tree(theta, "theta")
        if not jax.tree.leaves(theta):
            raise ProblemError("theta has no array leaves: nothing to optimise")
        for path, leaf in jax.tree_util.tree_flatten_with_path(theta)[0]:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise ProblemError(
                    f"theta{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}: "
                    f"{type(self).__name__} needs float leaves"
                )

    def check(self, problem, theta: PyTree) -> None:
        self.check_arguments(problem, theta)
        try:
            out = jax.eval_shape(problem.residuals, theta)
        except ProblemError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's residual function failed: say where
            raise ProblemError(f"evaluating {type(problem).__name__}.residuals(theta) failed: {e}") from e
        _check_residual_shape(problem, out)

    def init(self, problem, theta: PyTree) -> LeastSquaresState:
        state = _compiled_init(self, problem, theta)
        # Strong dtypes: optimistix starts its step counters and some iterates weakly typed, and a weak leaf makes
        # the compiled step trace and compile twice (weak after init, strong after the first step).
        return jax.tree.map(lambda a: jnp.array(a, dtype=a.dtype) if getattr(a, "weak_type", False) else a, state)

    def init_traced(self, problem, theta: PyTree):
        """``(state, static)``: :meth:`init` without its own compilation (traced inside another compiled
        function), and the non-array parts of the solver state."""
        flat, unravel = ravel_pytree(theta)
        _check_residual_shape(problem, jax.eval_shape(problem.residuals, theta))
        if self.scale:
            J0 = jax.jacfwd(lambda f: problem.residuals(unravel(f)))(flat)
            cn = jnp.linalg.norm(J0, axis=0)
            ok = jnp.isfinite(cn) & (cn > 0)
            scale = jnp.where(ok, 1.0 / jnp.where(ok, cn, 1.0), 1.0)
        else:
            scale = jnp.ones_like(flat)
        args = (problem, unravel, scale)
        w = flat / scale
        solver = self.solver()
        f_struct, aux_struct = eqx.filter_eval_shape(self._fn, w, args)
        inner = solver.init(self._fn, w, args, self._options(), f_struct, aux_struct, frozenset())
        arrays, static = eqx.partition(inner, eqx.is_array)
        inner = jax.tree.map(jnp.asarray, arrays)
        return LeastSquaresState(inner=inner, scale=scale, w=w), static

    @staticmethod
    def _scaled(theta, state: LeastSquaresState):
        """``(w, unravel)``: the state's scaled iterate where it maps to ``theta``, else ``theta / scale``."""
        flat, unravel = ravel_pytree(theta)
        w = jnp.where(state.w * state.scale == flat, state.w, flat / state.scale)
        return w, unravel

    def _done(self, state: LeastSquaresState):
        """The solver's termination flag and result. Gauss–Newton-type optimistix solvers read only the state's
        flags in ``terminate``, so the array leaves suffice (no tracing of the static parts)."""
        return self.solver().terminate(None, None, None, self._options(), state.inner, frozenset())

    def _advance(self, problem, theta, state: LeastSquaresState, static=None):
        """One solver step (no statistics): ``(new_theta, new_state)``; a terminated state is left as it is.
        ``static``: the non-array parts of the solver state if known (else rebuilt by abstract evaluation)."""
        w, unravel = self._scaled(theta, state)
        args = (problem, unravel, state.scale)
        solver = self.solver()
        inner = eqx.combine(state.inner, self._inner_static(solver, w, args) if static is None else static)
        done, _ = self._done(state)
        w_new, inner_new, _ = solver.step(self._fn, w, args, self._options(), inner, frozenset())
        inner_new = eqx.filter(inner_new, eqx.is_array)
        inner_new = jax.tree.map(
            lambda new, old: jnp.where(done, old, new).astype(jnp.result_type(old)), inner_new, state.inner
        )
        w_new = jnp.where(done, w, w_new)
        return unravel(w_new * state.scale), LeastSquaresState(inner=inner_new, scale=state.scale, w=w_new)

    def step(self, problem, theta: PyTree, state: LeastSquaresState, *, key: jax.Array):
        del key  # deterministic
        return _compiled_step(self, problem, theta, state)

    def step_traced(self, problem, theta: PyTree, state: LeastSquaresState):
        """:meth:`step` without its own compilation (to be traced inside another compiled function)."""
        r, vjp = jax.vjp(problem.residuals, theta)
        (g,) = vjp(r)
        stats = StepStats(
            objective=0.5 * jnp.sum(r**2),
            objective_stderr=jnp.zeros((), r.dtype),
            grad_norm=jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))),
        )
        new_theta, new_state = self._advance(problem, theta, state)
        return new_theta, new_state, stats

    def terminated(self, state: LeastSquaresState) -> tuple[jax.Array, jax.Array]:
        """``(done, code)``: whether the solver's termination test has held (Cauchy criterion on the iterate and
        the residuals with ``rtol``/``atol``, or a failure) and the result code (:func:`result_code`: 0
        successful, else the index of the optimistix result name in :data:`RESULT_NAMES`)."""
        done, result = self._done(state)
        return done, result_code(result)

    def converged(self, state: LeastSquaresState) -> bool:
        """True once the termination test holds successfully (a failed solve does not count as converged)."""
        done, code = self.terminated(state)
        return bool(done) and int(code) == SUCCESSFUL

    def describe(self) -> str:
        return f"{type(self).__name__}(rtol={self.rtol!r}, atol={self.atol!r}, scale={self.scale!r}, jac={self.jac!r})"


def _check_residual_shape(problem, out) -> None:
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 1:
        shape = getattr(out, "shape", type(out).__name__)
        raise ProblemError(f"{type(problem).__name__}.residuals(theta) must return a 1-D array, got {shape}")


@eqx.filter_jit
def _compiled_init(method, problem, theta):
    return method.init_traced(problem, theta)[0]


@eqx.filter_jit
def _compiled_step(method, problem, theta, state):
    return method.step_traced(problem, theta, state)


class LevenbergMarquardt(AbstractGaussNewtonMethod):
    r"""Levenberg–Marquardt steps (trust-region damping, Moré 1978) for a least-squares problem
    :math:`J(\theta)=\tfrac12\|r(\theta)\|^2`: each step solves
    :math:`\min_\delta \|r + \mathbf J\delta\|^2 + \lambda\|\delta\|^2` (on the scaled parameters, see the module
    documentation) by QR of the stacked system, and accepts it if the actual reduction is a fair share of the
    predicted one. Implemented by :class:`optimistix.LevenbergMarquardt`.

    ``pydso.minimize(problem, theta0, key=key, method=pydso.LevenbergMarquardt(), steps=100)``; one step is one
    trial point (accepted or rejected); after the termination test holds further steps leave ``theta`` as it is.

    **Arguments:**

    - ``rtol``, ``atol``: termination tolerances of the Cauchy test on ``theta`` and the residuals
      (:math:`|\Delta w| \le atol + rtol\,|w|` and the same for :math:`r`, max norm).
    - ``scale``: Jacobi column scaling fixed at the start point (default True).
    - ``linear_solver``: the lineax solver of the damped system (default :class:`lineax.QR`).
    - ``jac``: ``"fwd"`` (forward-mode Jacobian, :math:`p` passes; default, best when there are more residuals than
      parameters) or ``"bwd"`` (reverse mode, :math:`m` passes).

    **When not to use it:** for noisy (Monte-Carlo) objectives, or objectives that are not sums of squares.
    """

    rtol: float = 1e-8
    atol: float = 1e-8
    scale: bool = True
    linear_solver: lx.AbstractLinearSolver = lx.QR()
    jac: str = "fwd"

    def solver(self) -> optx.AbstractLeastSquaresSolver:
        return optx.LevenbergMarquardt(rtol=self.rtol, atol=self.atol, linear_solver=self.linear_solver)


class GaussNewton(AbstractGaussNewtonMethod):
    r"""Gauss–Newton steps for a least-squares problem: :math:`\theta \leftarrow \theta + \delta` with
    :math:`\delta = \arg\min_\delta\|r + \mathbf J\delta\|` (full steps, no damping). Implemented by
    :class:`optimistix.GaussNewton`.

    **Arguments:** ``rtol``, ``atol``, ``jac`` as for :class:`LevenbergMarquardt`; ``scale`` (default False: the
    Gauss–Newton step is invariant to scaling the parameters); ``linear_solver`` (default
    ``lineax.AutoLinearSolver(well_posed=None)``: QR for full rank, SVD-based otherwise).

    **When not to use it:** far from the optimum or with large residuals at the optimum, where full Gauss–Newton
    steps can diverge: use :class:`LevenbergMarquardt`.
    """

    rtol: float = 1e-8
    atol: float = 1e-8
    scale: bool = False
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    jac: str = "fwd"

    def solver(self) -> optx.AbstractLeastSquaresSolver:
        return optx.GaussNewton(rtol=self.rtol, atol=self.atol, linear_solver=self.linear_solver)


class LeastSquaresSolution(eqx.Module):
    r"""The outcome of :func:`solve_least_squares`: ``theta``, ``num_steps``, ``code`` (the index of optimistix's
    result name in :data:`RESULT_NAMES`: 0 successful, 1 max_steps_reached, ...), ``state`` (the method state, to
    continue with :func:`pydso.minimize` or inspect), ``cost`` (:math:`\tfrac12\|r\|^2` at ``theta``) and
    ``grad_cosine`` (:func:`gradient_cosine` at ``theta``: small at a first-order optimum). In a batch
    (:func:`solve_least_squares_batch`) every field has a leading start axis."""

    theta: PyTree
    num_steps: jax.Array
    code: jax.Array
    state: LeastSquaresState
    cost: jax.Array
    grad_cosine: jax.Array

    @property
    def message(self) -> str:
        return result_message(int(self.code))

    @property
    def result_name(self) -> str:
        """The public name of optimistix's result (``optimistix.RESULTS.<name>``)."""
        c = int(self.code)
        return RESULT_NAMES[c] if 0 <= c < len(RESULT_NAMES) else "unknown"


def gradient_cosine(r: jax.Array, J: jax.Array) -> jax.Array:
    r"""The scale-free first-order optimality measure of MINPACK's ``gtol`` test (Moré, Garbow and Hillstrom,
    *User guide for MINPACK-1*, 1980): :math:`\max_i |\mathbf J_{:,i}^\top r| / (\|\mathbf J_{:,i}\|\,\|r\|)`, the
    largest cosine between the residual vector and a Jacobian column (0 where a column or ``r`` vanishes). It is
    0 at a stationary point of :math:`\tfrac12\|r\|^2` and does not depend on the scale of the parameters or of
    the residuals; LM stopping at a point where it is not small (say above 1e-4) stopped on small steps, not at
    an optimum."""
    g = J.T @ r
    cn = jnp.linalg.norm(J, axis=0)
    rn = jnp.linalg.norm(r)
    den = cn * rn
    ok = den > 0
    return jnp.max(jnp.where(ok, jnp.abs(g) / jnp.where(ok, den, 1.0), 0.0), initial=0.0)


def _solve_traced(method, problem, theta0, max_steps):
    state, static = method.init_traced(problem, theta0)

    def cond(carry):
        _, state, k = carry
        done, _ = method.terminated(state)
        return (k < max_steps) & ~done

    def body(carry):
        theta, state, k = carry
        done, _ = method.terminated(state)
        theta, state = method._advance(problem, theta, state, static)
        return theta, state, jnp.where(done, k, k + 1)

    theta, state, k = jax.lax.while_loop(cond, body, (theta0, state, jnp.zeros((), jnp.int32)))
    done, code = method.terminated(state)
    code = jnp.where(done, code, MAX_STEPS_REACHED)
    flat, unravel = ravel_pytree(theta)
    r = problem.residuals(theta)
    J = jax.jacfwd(lambda f: problem.residuals(unravel(f)))(flat)
    return LeastSquaresSolution(
        theta=theta,
        num_steps=k,
        code=code,
        state=state,
        cost=0.5 * jnp.sum(r**2),
        grad_cosine=gradient_cosine(r, J),
    )


@eqx.filter_jit
def _solve(method, problem, theta0, max_steps):
    return _solve_traced(method, problem, theta0, max_steps)


@eqx.filter_jit
def _solve_batch(method, problem, theta0s, max_steps):
    return jax.vmap(lambda th: _solve_traced(method, problem, th, max_steps))(theta0s)


def _traced_tolerances(method):
    """``method`` with ``rtol``/``atol`` as 0-d arrays: traced by the compiled solve, so that changing them does not
    recompile (the compiled code is keyed on the method's type and static structure only)."""
    return eqx.tree_at(
        lambda m: (m.rtol, m.atol),
        method,
        (jnp.asarray(float(method.rtol)), jnp.asarray(float(method.atol))),
    )


def _prepare(problem, method, max_steps):
    method = LevenbergMarquardt() if method is None else method
    if not isinstance(method, AbstractGaussNewtonMethod):
        raise ProblemError(f"method must be LevenbergMarquardt or GaussNewton, got {type(method).__name__}")
    max_steps = check_positive_int(max_steps, "max_steps")
    return _traced_tolerances(method), jnp.asarray(max_steps, jnp.int32)


def solve_least_squares(
    problem: AbstractLeastSquares, theta0: PyTree, *, method: AbstractGaussNewtonMethod | None = None, max_steps=256
) -> LeastSquaresSolution:
    r"""Minimise :math:`\tfrac12\|r(\theta)\|^2` of ``problem`` from ``theta0`` with ``method`` (default
    :class:`LevenbergMarquardt`) until its termination test holds or ``max_steps`` steps, in one compiled
    ``while_loop`` (the same steps :func:`pydso.minimize` takes one at a time, without its per-step bookkeeping).

    Compiled once per method type, problem structure and shapes (:func:`equinox.filter_jit`; a problem that is an
    :class:`equinox.Module` passes its arrays as traced arguments, so problems of the same shape share the code).
    ``max_steps`` and the method's ``rtol``/``atol`` are traced values: changing them does not recompile.

    **Arguments:** ``problem`` (an :class:`~pydso.optimize.AbstractLeastSquares`), ``theta0`` (pytree of float
    arrays), ``method``, ``max_steps`` (positive int).

    **Returns:** a :class:`LeastSquaresSolution`. Does not raise on non-convergence: check ``code`` / ``message``.
    """
    method, max_steps = _prepare(problem, method, max_steps)
    theta0 = jax.tree.map(jnp.asarray, theta0)
    method.check_arguments(problem, theta0)  # the residuals' shape is checked when _solve is traced
    return _solve(method, problem, theta0, max_steps)


def solve_least_squares_batch(
    problem: AbstractLeastSquares, theta0s: PyTree, *, method: AbstractGaussNewtonMethod | None = None, max_steps=256
) -> LeastSquaresSolution:
    r"""Multi-start: :func:`solve_least_squares` from every start in ``theta0s`` (a pytree whose leaves have a
    leading start axis), as **one** compiled, ``jax.vmap``-ed solve (a start that has terminated is frozen while
    the others go on; ``num_steps`` counts each start's own steps).

    **Returns:** a :class:`LeastSquaresSolution` whose fields have a leading start axis. Pick the best start by
    ``cost`` (and ``code``); do not use it when the starts need different problem structures.
    """
    method, max_steps = _prepare(problem, method, max_steps)
    theta0s = jax.tree.map(jnp.asarray, theta0s)
    method.check_arguments(problem, theta0s)
    n = {leaf.shape[0] if leaf.ndim else -1 for leaf in jax.tree.leaves(theta0s)}
    if len(n) != 1 or -1 in n:
        raise ProblemError(f"theta0s must have one leading start axis on every leaf, got leading sizes {sorted(n)}")
    return _solve_batch(method, problem, theta0s, max_steps)


@eqx.filter_jit
def _solve_many(method, problems, theta0s, max_steps):
    return eqx.filter_vmap(lambda p, th: _solve_traced(method, p, th, max_steps))(problems, theta0s)


def solve_least_squares_many(
    problems: AbstractLeastSquares,
    theta0s: PyTree,
    *,
    method: AbstractGaussNewtonMethod | None = None,
    max_steps=256,
) -> LeastSquaresSolution:
    r"""Many independent least-squares problems of one structure in **one** compiled, vmapped solve:
    ``problems`` is an :class:`equinox.Module` problem whose array leaves carry a leading batch axis (problems
    of equal shapes stacked with ``jax.tree.map(lambda *x: jnp.stack(x), *problems)``), ``theta0s`` the
    starts with the same leading axis. A problem that has terminated is frozen while the others go on.

    **Returns:** a :class:`LeastSquaresSolution` with a leading batch axis. Not for problems of different
    shapes or static structure (they cannot be stacked).
    """
    method, max_steps = _prepare(problems, method, max_steps)
    theta0s = jax.tree.map(jnp.asarray, theta0s)
    check_finite_tree(theta0s, "theta0s")
    return _solve_many(method, problems, theta0s, max_steps)
