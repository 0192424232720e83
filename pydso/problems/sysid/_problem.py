r"""The single-experiment problem: :class:`SysIdProblem` (an :class:`~pydso.optimize.AbstractLeastSquares`: the
residuals of every loss over the unconstrained parameter vector), the shared machinery of identification problems
(:class:`AbstractSysIdProblem`: solve, covariance, report), its outcome :class:`SysIdResult`, the fit metrics and
the constructors :func:`sysid` and :func:`fit`.

Problems are :class:`equinox.Module` s: their data are array leaves and everything else (model, loss, parameter
space, sizes) is static, so every compiled function (:func:`pydso.optimize.solve_least_squares`, the covariance
pass) takes the problem as an argument and is reused by all problems of the same model, loss and shapes.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ..._checks import check_positive_int
from ..._errors import DivergenceError
from ..._typing import PyTree
from ...optimize import (
    AbstractLeastSquares,
    LevenbergMarquardt,
    solve_least_squares,
    solve_least_squares_batch,
    solve_least_squares_many,
)
from ...optimize._least_squares import RESULT_NAMES, AbstractGaussNewtonMethod, result_code, result_message
from .._contract import AbstractConstructedProblem
from ._data import extract_arrays
from ._diagnostics import ar_sandwich, identifiability, whiteness_test
from ._errors import SysIdError, SysIdWarning
from ._losses import GaussianNLL, MultipleShooting, Prediction, Simulation, as_loss
from ._models import StateSpaceModel, simulate, simulate_outputs, simulate_states
from ._transforms import ParamSpace, check_finite_guess, transform_pair

__all__ = [
    "SysIdResult",
    "MultiStart",
    "Score",
    "Simulator",
    "AbstractSysIdProblem",
    "SysIdProblem",
    "fit_metrics",
    "sysid",
    "fit",
]


@dataclasses.dataclass
class MultiStart:
    r"""Every start of a multi-start fit (:meth:`SysIdProblem.fit` with ``n_starts``/``starts``/``sampler``), run as
    one vmapped solve: per start ``cost`` (the estimation loss, :math:`\tfrac12\|r\|^2`), ``code``/``message`` (the
    solver outcome), ``n_steps``, ``grad_cosine`` and ``estimate`` ``(start, parameter)`` (physical); ``best`` the
    index of the start reported (the lowest finite cost)."""

    cost: np.ndarray
    code: np.ndarray
    message: list
    n_steps: np.ndarray
    grad_cosine: np.ndarray
    estimate: np.ndarray
    best: int

    @property
    def n_starts(self) -> int:
        return int(self.cost.size)

    def n_at_best(self, rtol: float = 1e-6) -> int:
        """How many starts reached the best cost within ``rtol`` (relative)."""
        c = self.cost[self.best]
        return int(np.sum(np.abs(self.cost - c) <= rtol * max(abs(c), 1e-300)))

    def summary(self) -> str:
        c = self.cost[np.isfinite(self.cost)]
        q = np.quantile(c, [0.0, 0.5, 1.0]) if c.size else np.full(3, np.nan)
        return (
            f"{self.n_starts} starts: best cost {self.cost[self.best]:.6g} (start {self.best}), "
            f"{self.n_at_best()} within 1e-6 of it; cost min/median/max {q[0]:.4g}/{q[1]:.4g}/{q[2]:.4g}; "
            f"{int(np.sum(self.code == 0))} successful, {int(np.sum(~np.isfinite(self.cost)))} non-finite"
        )


@dataclasses.dataclass
class Score:
    r"""Outcome of :meth:`SysIdResult.score`: per output channel ``rmse`` (physical units), ``nrmse`` (RMSE over the
    standard deviation of the data) and ``fit_percent`` (:math:`100(1 - \|\hat y - y\|/\|y - \bar y\|)`) on the
    samples from ``skip`` on; ``y_sim`` ``(episode, time, output)`` the simulation; ``x0`` the initial states used."""

    rmse: np.ndarray
    nrmse: np.ndarray
    fit_percent: np.ndarray
    y_sim: np.ndarray
    x0: np.ndarray
    skip: int

    def __str__(self) -> str:
        return (
            f"RMSE={np.array2string(self.rmse, precision=5)} NRMSE={np.array2string(self.nrmse, precision=4)} "
            f"fit%={np.array2string(self.fit_percent, precision=2)} (samples {self.skip}.. ; x0 per episode "
            f"{np.array2string(self.x0, precision=4)})"
        )


@dataclasses.dataclass
class SysIdResult:
    r"""Outcome of :func:`fit`: physical estimates with standard errors, 95% intervals and fit metrics.

    ``names``/``estimate``/``stderr``/``ci_low``/``ci_high`` are per scalar parameter (flattened pytree);
    ``params`` is the estimate as the model's pytree; ``x0`` the initial states (episode, state);
    ``rmse``/``nrmse``/``fit_percent`` are per output channel of the free-run simulation (physical units);
    ``y_sim`` the simulated outputs (episode, time, output); ``noise_std`` the estimated measurement noise
    std per output (physical units: the NLL estimate for :class:`GaussianNLL`, else the residual RMS corrected
    for the degrees of freedom).

    Intervals are computed in the unconstrained coordinates of each parameter's transform and mapped back (so
    they never cross a bound; for untransformed parameters they are the usual :math:`\hat\theta \pm t\,se`);
    ``stderr`` is the delta-method standard error in physical units. ``covariance`` names the covariance used
    (``'white'``: :math:`\hat\sigma^2(J^\top J)^{-1}`; ``'ar'``: the sandwich for AR residuals of
    :func:`~pydso.problems.sysid.ar_sandwich`; ``'nll'``: inverse observed information), ``whiteness`` the
    residual tests (:class:`~pydso.problems.sysid.Whiteness`). ``identifiable`` flags each parameter (False:
    the Jacobian does not determine it; its interval is infinite, ``stderr`` inf); ``fixed`` flags parameters
    held at given values (``stderr`` 0). ``stop_reason`` says why the solver stopped (``'gradient_tolerance'``,
    ``'step_function_tolerance'``, ``'max_steps_reached'`` or an optimistix failure name) and ``grad_cosine`` is
    the scale-free optimality measure at the estimate (:func:`pydso.optimize.gradient_cosine`); ``warnings``
    lists what the fit warned about; ``multistart`` every start of a multi-start fit (:class:`MultiStart`).
    """

    names: list
    estimate: np.ndarray
    stderr: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    cov: np.ndarray
    params: PyTree
    x0: np.ndarray
    sigma2: float
    rmse: np.ndarray
    nrmse: np.ndarray
    fit_percent: np.ndarray
    cost: float
    n_steps: int
    converged: bool
    message: str
    loss: str
    y_sim: np.ndarray
    n_samples: int
    dof: int
    noise_std: np.ndarray
    model: object = None
    fixed: np.ndarray | None = None
    identifiable: np.ndarray | None = None
    covariance: str = "white"
    whiteness: object = None
    stop_reason: str = ""
    grad_cosine: float = float("nan")
    warnings: tuple = ()
    multistart: MultiStart | None = None

    def simulate(self, data=None, u=None, *, dt: float | None = None, x0=None, n_init: int | None = None):
        """Simulate the fitted model on new data.

        * ``result.simulate(dataset, x0=..., n_init=k)``: on a pydso dataset (its ``input``; its ``output`` when
          the initial state is estimated): ``x0="estimate"`` (default when the dataset has an ``output``)
          estimates each episode's initial state from its first ``n_init`` samples only (default
          ``min(100, max(3, T // 5))``; the parameters are held at the estimate), or ``x0`` gives it (``(n_states,)`` or
          ``(episode, n_states)``; default without output: the fit's first episode's). Returns ``(episode, time,
          output)``.
        * ``result.simulate(model, u, dt=..., x0=None)`` (the older form): ``model`` with the estimated parameters
          on the input ``u`` (``(T, input_dim)`` or a batch), from ``x0`` (default: the first episode's).
        """
        if isinstance(data, StateSpaceModel):
            if dt is None:
                if data.kind != "discrete":
                    raise SysIdError("result.simulate(model, u, dt=...): a continuous model needs the sample time dt")
                dt = data.dt if data.dt is not None else 1.0
            return simulate(data, self.params, u, dt=dt, x0=self.x0[0] if x0 is None else x0)
        return self._validate(data, x0, n_init)[0]

    def score(self, data, *, x0="estimate", n_init: int | None = None, skip: int | None = None) -> Score:
        """Validation on new data: RMSE, NRMSE and fit % of the free-run simulation of :meth:`simulate` against
        the dataset's ``output``, on the samples from ``skip`` on (default: ``n_init`` when the initial state is
        estimated from the first ``n_init`` samples, so that no sample used for it is scored; else 0).

        **Returns:** a :class:`Score`.
        """
        ys, x0v, n0 = self._validate(data, x0, n_init)
        if "output" not in data.data_vars:
            raise SysIdError("score(data): the dataset has no 'output' variable to compare the simulation with")
        y = np.asarray(data["output"].transpose("episode", "time", ...).values, float)
        y = y[..., None] if y.ndim == 2 else y
        k = (n0 if isinstance(x0, str) else 0) if skip is None else int(skip)
        if not 0 <= k < y.shape[1] - 1:
            raise SysIdError(f"skip = {k} leaves fewer than 2 samples of the {y.shape[1]} to score")
        rmse, nrmse, fitp = fit_metrics(ys[:, k:], y[:, k:])
        return Score(rmse=rmse, nrmse=nrmse, fit_percent=fitp, y_sim=ys, x0=x0v, skip=k)

    def _validate(self, data, x0, n_init):
        import xarray as xr

        if self.model is None:
            raise SysIdError("this result does not know its model: use result.simulate(model, u, dt=...)")
        if not isinstance(data, xr.Dataset):
            raise SysIdError(f"data must be a pydso dataset (xarray.Dataset), got {type(data).__name__}")
        model = self.model
        if isinstance(x0, str) and x0 != "estimate":
            raise SysIdError(f"x0 must be 'estimate', None or an array of initial states, got {x0!r}")
        if x0 is None and "output" in data.data_vars:
            x0 = "estimate"
        probe = data if "output" in data.data_vars else data.assign(output=data["input"] * 0.0)
        u, _, ts, dt, _ = extract_arrays(probe, model)
        E, T = u.shape[:2]
        n0 = min(100, max(3, T // 5)) if n_init is None else int(n_init)
        if isinstance(x0, str):
            if not 3 <= n0 <= T:
                raise SysIdError(f"n_init = {n_init} must be between 3 and the record length {T}")
            if model.estimate_x0:
                head = data.isel(time=slice(0, n0))
                names = list(self.names)
                p = SysIdProblem(model, head, params=self.params, transforms={}, fixed=names, x0=self.x0[0])
                sol = solve_least_squares(p, p.theta0, method=LevenbergMarquardt(1e-10, 1e-10), max_steps=200)
                x0v = np.asarray(p.sim.theta_x0(p.expand(sol.theta)[: p.n_core])[1])
            else:
                x0v = np.broadcast_to(model.x0, (E, model.n_states)).copy()
        else:
            x0v = np.asarray(self.x0[0] if x0 is None else x0, float)
            x0v = np.broadcast_to(x0v, (E, model.n_states)) if x0v.ndim == 1 else x0v
            if x0v.shape != (E, model.n_states):
                raise SysIdError(
                    f"x0 has shape {np.shape(x0)}; expected ({model.n_states},) or ({E}, {model.n_states})"
                )
        ys = simulate(model, self.params, u, dt=dt, x0=x0v, t0=float(ts[0]))
        return ys, x0v, n0

    def as_dict(self) -> dict:
        """``{name: estimate}`` of the scalar parameters."""
        return {n: float(v) for n, v in zip(self.names, self.estimate, strict=True)}

    def summary(self) -> str:
        fixed = self.fixed if self.fixed is not None else np.zeros(len(self.names), bool)
        ident = self.identifiable if self.identifiable is not None else np.ones(len(self.names), bool)
        lines = [f"{'parameter':>14} {'estimate':>13} {'stderr':>11} {'95% CI':>27}"]
        for n, e, s, lo, hi, fx, ok in zip(
            self.names, self.estimate, self.stderr, self.ci_low, self.ci_high, fixed, ident, strict=True
        ):
            note = " (fixed)" if fx else "" if ok else " (NOT identifiable)"
            lines.append(f"{n:>14} {e:13.6g} {s:11.3g}   [{lo:11.5g}, {hi:11.5g}]{note}")
        lines.append(
            f"loss={self.loss} converged={self.converged} steps={self.n_steps} stop={self.stop_reason or '-'} "
            f"covariance={self.covariance}"
        )
        lines.append(
            f"RMSE={np.array2string(self.rmse, precision=4)} NRMSE={np.array2string(self.nrmse, precision=4)} "
            f"fit%={np.array2string(self.fit_percent, precision=2)}"
        )
        if self.whiteness is not None:
            lines.append(self.whiteness.summary())
        if self.multistart is not None:
            lines.append(self.multistart.summary())
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- simulation
class Simulator(eqx.Module):
    r"""Free-run simulation of one experiment's episodes as a function of the core unconstrained vector
    ``z = [parameters | initial states (episode, state) if estimated]``: outputs, scaled residuals
    :math:`(\hat y - y)/s` and the physical parameters. Shared by every loss (the covariance always uses the
    simulation residuals)."""

    model: StateSpaceModel = eqx.field(static=True)
    space: ParamSpace = eqx.field(static=True)
    u: jax.Array
    y: jax.Array
    t0: jax.Array
    dt: jax.Array
    scale: jax.Array
    x0: jax.Array
    x0_specs: tuple = eqx.field(static=True, default=())

    @property
    def n_theta(self) -> int:
        return self.space.size

    @property
    def n_x0(self) -> int:
        return int(np.prod(self.x0.shape[-2:])) if self.model.estimate_x0 else 0

    def theta_x0(self, z):
        """The physical parameter pytree and the initial states ``(episode, state)`` from ``z``."""
        theta = self.space.unflatten(z[: self.n_theta])
        if self.model.estimate_x0:
            x0 = z[self.n_theta : self.n_theta + self.n_x0].reshape(self.x0.shape)
            if any(spec is not None for spec in self.x0_specs):
                cols = [transform_pair(spec, f"x0[{i}]")[0](x0[..., i]) for i, spec in enumerate(self.x0_specs)]
                x0 = jnp.stack(cols, axis=-1)
        else:
            x0 = self.x0
        return theta, x0

    def outputs(self, z):
        """Simulated outputs ``(episode, time, output)``."""
        theta, x0 = self.theta_x0(z)
        return simulate_outputs(self.model, theta, x0, self.u, dt=self.dt, t0=self.t0)[0]

    def residuals(self, z):
        return ((self.outputs(z) - self.y) / self.scale).ravel()

    def physical_flat(self, zt):
        """Physical values of the scalar parameters from the parameter block ``z[:n_theta]``."""
        return self.space.physical_flat(zt)


def _covariance_values(sim, zc):
    r = sim.residuals(zc)
    J = jax.jacfwd(sim.residuals)(zc)
    ys = sim.outputs(zc)
    zt = zc[: sim.n_theta]
    G = jax.jvp(sim.physical_flat, (zt,), (jnp.ones_like(zt),))[1]  # transforms act elementwise
    return r, J, ys, G, sim.physical_flat(zt)


@eqx.filter_jit
def _covariance_pass(sim, zc):
    """Simulation residuals, their Jacobian, simulated outputs, the transform Jacobian and the physical
    parameters at the core vector ``zc`` (compiled once per simulator structure: shared by all losses)."""
    return _covariance_values(sim, zc)


@eqx.filter_jit
def _physical_flat(sim, zt):
    return sim.physical_flat(zt)


@eqx.filter_jit
def _theta_x0(sim, zc):
    return sim.theta_x0(zc)


@functools.lru_cache(maxsize=256)
def _t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


@eqx.filter_jit
def _covariance_pass_many(sims, zcs):
    """:func:`_covariance_pass` of stacked simulators (leading batch axis), vmapped."""
    return eqx.filter_vmap(_covariance_values)(sims, zcs)


@eqx.filter_jit
def _nll_hessian(problem, z):
    return jax.hessian(problem.objective)(z)


@eqx.filter_jit
def _bfgs(problem, z0, rtol, atol, max_steps):
    sol = optx.minimise(
        lambda z, p: p.objective(z), optx.BFGS(rtol=rtol, atol=atol), z0, args=problem, max_steps=max_steps, throw=False
    )
    return sol.value, result_code(sol.result), sol.stats["num_steps"]


@eqx.filter_jit
def _optax(problem, z0, optimizer, steps):
    def body(carry, _):
        z, st = carry
        g = jax.grad(problem.objective)(z)
        upd, st = optimizer.update(g, st, z)
        return (z + upd, st), None

    (z, _), _ = jax.lax.scan(body, (z0, optimizer.init(z0)), None, length=steps)
    return z


# ----------------------------------------------------------------------------------------------- problems
class AbstractSysIdProblem(AbstractLeastSquares, AbstractConstructedProblem):
    r"""What :class:`SysIdProblem` and :class:`~pydso.problems.sysid.JointSysIdProblem` share: the unconstrained
    vector ``theta = [parameters | initial states | segment states | log noise]`` (:attr:`theta0` its start),
    :meth:`residuals` of the loss (least squares), :meth:`objective`, and the solve and covariance of :meth:`fit`.
    """

    sim: eqx.AbstractVar[object]  # the simulator of the core vector (Simulator or its joint version)
    loss: eqx.AbstractVar[object]
    theta0: eqx.AbstractVar[jax.Array]

    @property
    @abc.abstractmethod
    def n_theta(self) -> int:
        """Length of the parameter block of ``theta``."""

    @property
    @abc.abstractmethod
    def n_x0(self) -> int:
        """Length of the initial-state block of ``theta``."""

    @property
    def z0(self) -> jax.Array:
        """Alias of :attr:`theta0` (the initial unconstrained vector)."""
        return self.theta0

    @property
    def model(self) -> StateSpaceModel:
        return self.sim.model

    @property
    def space(self) -> ParamSpace:
        return self.sim.space

    @property
    def n_core(self) -> int:
        return self.n_theta + self.n_x0

    @property
    def free_index(self):
        """Indices of the free entries of the full unconstrained vector (``None``: all free). ``theta`` (what the
        solvers see, :attr:`theta0`) holds only these; :meth:`expand` inserts the fixed values."""
        return getattr(self, "free_idx", None)

    def expand(self, theta):
        """The full unconstrained vector ``[parameters | initial states | ...]`` from ``theta`` (the free entries;
        fixed parameters and initial states take their given values)."""
        idx = self.free_index
        if idx is None:
            return theta
        return self.z_full.at[np.asarray(idx, dtype=np.int64)].set(theta)

    def simulate_outputs(self, z):
        """Free-run simulated outputs at the unconstrained vector ``z`` (free entries)."""
        return self.sim.outputs(self.expand(z)[: self.n_core])

    def simulation_residuals(self, z):
        """Scaled free-run simulation residuals at the unconstrained vector ``z`` (free entries)."""
        return self.sim.residuals(self.expand(z)[: self.n_core])

    def objective(self, z):
        r""":math:`\tfrac12\|r(z)\|^2`, or for :class:`GaussianNLL` the negative log-likelihood
        :math:`\sum 0.5 (r e^{-\ell})^2 + \ell` with the log noise levels :math:`\ell` (scaled units) at the end
        of ``z``."""
        if isinstance(self.loss, GaussianNLL):
            zf = self.expand(z)
            ny = self.sim.scale.shape[-1]
            r = self.sim.residuals(zf[: self.n_core]).reshape(-1, ny)
            ls = zf[self.n_core :]
            return jnp.sum(0.5 * (r * jnp.exp(-ls)) ** 2 + ls)
        return 0.5 * jnp.sum(self.residuals(z) ** 2)

    def _check_least_squares(self):
        if isinstance(self.loss, GaussianNLL):
            raise SysIdError(
                "the Gaussian NLL loss is not a least-squares objective (its noise levels are estimated): fit it "
                "with solver='bfgs', or minimise problem.objective"
            )

    # ---- starts
    def start_vectors(self, *, n_starts=1, starts=None, sampler=None, key=None, spread: float = 0.5):
        r"""The starting vectors ``(start, len(theta0))`` of a multi-start fit; the first is :attr:`theta0`.

        ``starts``: a list of parameter guesses (dicts of physical values, merged onto the model's guess; or full
        pytrees), each converted by the parameter transforms; ``sampler(key) -> guess`` draws ``n_starts - 1``
        more guesses from ``key``; otherwise ``n_starts - 1`` random perturbations of the unconstrained parameters
        :math:`z_i + s\,\xi\max(|z_i|, 1)`, :math:`\xi \sim \mathcal N(0, 1)`, ``s = spread`` (for a positive
        parameter, a log-normal factor). Fixed parameters keep their values; initial states start from the
        guess."""
        z0 = np.asarray(self.theta0, float)
        zf0 = np.asarray(self.expand(self.theta0), float)
        n_th = self.n_theta
        rows = [z0]
        free = np.arange(zf0.size) if self.free_index is None else np.asarray(self.free_index)

        def from_guess(guess, what):
            base = self.space.unflatten(jnp.asarray(zf0[:n_th]))
            if isinstance(guess, dict) and isinstance(base, dict):
                unknown = set(guess) - set(base)
                if unknown:
                    raise SysIdError(f"{what} names unknown parameters {sorted(unknown)}; have {sorted(base)}")
                guess = {**base, **guess}
            try:
                sp = ParamSpace(guess, dict(zip(self.space.leaf_names, self.space.specs, strict=True)))
            except SysIdError as e:
                raise SysIdError(f"{what}: {e}") from None
            if sp.size != n_th:
                raise SysIdError(f"{what} has {sp.size} scalar parameters, the model has {n_th}")
            zf = zf0.copy()
            zf[:n_th] = np.asarray(sp.z0)
            if self.free_index is not None:  # fixed entries keep their values
                fixed = np.setdiff1d(np.arange(n_th), free)
                zf[fixed] = zf0[fixed]
            return zf[free]

        for i, g in enumerate(starts or []):
            rows.append(from_guess(g, f"starts[{i}]"))
        n_more = int(n_starts) - len(rows)
        if n_more > 0:
            if key is None:
                raise SysIdError(f"n_starts = {n_starts} needs key=jax.random.PRNGKey(...) to draw the starting points")
            keys = jax.random.split(key, n_more)
            if sampler is not None:
                for i, k in enumerate(keys):
                    rows.append(from_guess(sampler(k), f"sampler start {i}"))
            else:
                xi = np.asarray(jax.random.normal(keys[0], (n_more, zf0.size)))
                mag = np.maximum(np.abs(zf0), 1.0)
                specs = (
                    np.concatenate(
                        [
                            np.full(sz, sp is not None and sp != "identity")
                            for sp, sz in zip(self.space.specs, self.space.sizes, strict=True)
                        ]
                        + [np.zeros(zf0.size - n_th, bool)]
                    )
                    if n_th
                    else np.zeros(zf0.size, bool)
                )
                mag = np.where(specs, 1.0, mag)  # transformed: perturb in the unconstrained scale directly
                pert = np.zeros_like(xi)
                pert[:, :n_th] = spread * xi[:, :n_th] * mag[:n_th]
                for row in zf0[None] + pert:
                    rows.append(row[free])
        return np.stack(rows)

    # ---- solving
    def _run(self, solver, rtol, atol, max_steps, optimizer, steps, z0):
        """``(z, result code, n_steps, grad_cosine)`` of the chosen solver from ``z0``."""
        z0 = self.theta0 if z0 is None else jnp.asarray(z0, float)
        if z0.shape != self.theta0.shape:
            raise SysIdError(f"z0 has shape {z0.shape}, expected {self.theta0.shape} (see problem.theta0)")
        if not bool(np.all(np.isfinite(np.asarray(z0)))):
            bad = int(np.flatnonzero(~np.isfinite(np.asarray(z0)))[0])
            raise SysIdError(f"starting vector z0 has a non-finite entry at index {bad}: give finite initial guesses")
        is_nll = isinstance(self.loss, GaussianNLL)
        if isinstance(solver, AbstractGaussNewtonMethod) or (solver == "lm" and not is_nll):
            method = solver if isinstance(solver, AbstractGaussNewtonMethod) else LevenbergMarquardt(rtol, atol)
            sol = solve_least_squares(self, z0, method=method, max_steps=max_steps)
            return sol.theta, int(sol.code), int(sol.num_steps), float(sol.grad_cosine)
        if solver in ("lm", "bfgs"):
            z, code, n = _bfgs(self, z0, rtol, atol, max_steps)
            return z, int(code), int(n), float("nan")
        if solver == "optax":
            import optax

            opt = optimizer if optimizer is not None else optax.adam(1e-2)
            return _optax(self, z0, opt, steps), 0, steps, float("nan")
        raise SysIdError(
            f"unknown solver {solver!r}: use 'lm', 'bfgs', 'optax' or a pydso.LevenbergMarquardt/GaussNewton object"
        )

    def _run_many(self, solver, rtol, atol, max_steps, optimizer, steps, Z0):
        """Multi-start: every row of ``Z0``; Levenberg-Marquardt / Gauss-Newton as one vmapped compiled solve,
        other solvers one after the other. Returns ``(best z, code, n_steps, grad_cosine, MultiStart)``."""
        Z0 = jnp.asarray(Z0, float)
        if not bool(np.all(np.isfinite(np.asarray(Z0)))):
            bad = int(np.argwhere(~np.isfinite(np.asarray(Z0)))[0, 0])
            raise SysIdError(f"start {bad} has non-finite entries: give finite initial guesses")
        is_nll = isinstance(self.loss, GaussianNLL)
        if isinstance(solver, AbstractGaussNewtonMethod) or (solver == "lm" and not is_nll):
            method = solver if isinstance(solver, AbstractGaussNewtonMethod) else LevenbergMarquardt(rtol, atol)
            sol = solve_least_squares_batch(self, Z0, method=method, max_steps=max_steps)
            Z, codes, ns = np.asarray(sol.theta), np.asarray(sol.code), np.asarray(sol.num_steps)
            gc = np.asarray(sol.grad_cosine)
            costs = np.asarray(sol.cost)
        else:
            outs = [self._run(solver, rtol, atol, max_steps, optimizer, steps, z) for z in Z0]
            Z = np.stack([np.asarray(o[0]) for o in outs])
            codes = np.array([o[1] for o in outs])
            ns = np.array([o[2] for o in outs])
            gc = np.array([o[3] for o in outs])
            costs = np.array([float(self.objective(jnp.asarray(z))) for z in Z])
        costs = np.where(np.isfinite(costs) & np.all(np.isfinite(Z), axis=1), costs, np.inf)
        best = int(np.argmin(costs))
        est = np.stack(
            [
                np.asarray(
                    self.space.physical_flat(jnp.asarray(np.asarray(self.expand(jnp.asarray(z)))[: self.n_theta]))
                )
                for z in Z
            ]
        )
        ms = MultiStart(
            cost=costs,
            code=codes,
            message=[result_message(c) for c in codes],
            n_steps=ns,
            grad_cosine=gc,
            estimate=est,
            best=best,
        )
        return jnp.asarray(Z[best]), int(codes[best]), int(ns[best]), float(gc[best]), ms

    def _residual_layout(self):
        """``(E, T, ny)`` of the simulation residuals and the inputs ``(E, T, nu)``; None where unknown."""
        return None

    def _summary(self, z, n_steps, code, covariance: str = "white", precomputed=None) -> dict:
        """The covariance of the parameter block in physical units (``sigma^2 (J^T J)^-1`` of the simulation
        residuals over the free parameters and initial states, the AR sandwich, or the inverse observed
        information for :class:`GaussianNLL`, mapped by the delta method), intervals in the unconstrained
        coordinates, identifiability, the noise level and the fit metrics' inputs."""
        zfree = jnp.asarray(z)
        z = self.expand(zfree)
        n_core = self.n_core
        r, J, ys, G, est = _covariance_pass(self.sim, z[:n_core]) if precomputed is None else precomputed
        r, J, G, est = (np.asarray(a) for a in (r, J, G, est))
        finite = bool(np.all(np.isfinite(np.asarray(z)))) and bool(np.all(np.isfinite(r)))
        if not finite:
            hint = (
                "a better initial guess, parameter transforms, or shorter segments"
                if isinstance(self.loss, MultipleShooting)
                else "multiple shooting (loss='multiple-shooting'), a better initial guess or parameter transforms"
            )
            raise DivergenceError(
                f"sysid fit of model {self.sim.model.name!r} diverged (non-finite parameters or simulation) with "
                f"the {self.loss.name} loss; try {hint}"
            )
        ny = self.sim.scale.shape[-1]
        n_th = self.n_theta
        idx = np.arange(z.shape[0]) if self.free_index is None else np.asarray(self.free_index)
        free_core = idx[idx < n_core]
        fixed_theta = np.ones(n_th, bool)
        fixed_theta[free_core[free_core < n_th]] = False
        N = r.size
        n_free = free_core.size
        dof_raw = N - n_free
        dof = max(dof_raw, 1)
        ssr = float(r @ r)
        sigma2 = ssr / dof
        Jf = J[:, free_core]
        cn = np.linalg.norm(Jf, axis=0)
        ok_f, _ = identifiability(Jf / np.where(cn > 0, cn, 1.0))
        if dof_raw <= 0:
            ok_f[:] = False
        used = "white"
        whiteness = None
        layout = self._residual_layout()
        if layout is not None:
            shape, u = layout
            whiteness = whiteness_test(r.reshape(shape), u)
        warns = []
        if isinstance(self.loss, GaussianNLL):
            used = "nll"
            Hn = np.asarray(_nll_hessian(self, zfree))
            try:
                cov_free = np.linalg.pinv(Hn, hermitian=True)
            except np.linalg.LinAlgError:
                cov_free = np.full_like(Hn, np.nan)
            cov_full = np.zeros((z.shape[0], z.shape[0]))
            cov_full[np.ix_(idx, idx)] = cov_free
            cov_z = cov_full[:n_th, :n_th]
            ls = np.asarray(z[n_core:])
            cost = float(np.sum(0.5 * (r.reshape(-1, ny) * np.exp(-ls)) ** 2 + ls))
        else:
            cns = np.where(cn > 0, cn, 1.0)
            Js = Jf / cns  # scaled: the inverse is then well defined to machine precision
            try:
                A_inv = np.linalg.pinv(Js.T @ Js, rcond=1e-13, hermitian=True) / np.outer(cns, cns)
            except np.linalg.LinAlgError:
                A_inv = np.full((n_free, n_free), np.nan)
            want = covariance
            if covariance == "auto":
                coloured = whiteness is not None and not bool(np.all(whiteness.white))
                want = "ar" if coloured and ssr > 1e-24 * max(N, 1) else "white"
            if want == "ar" and layout is not None and n_free:
                Mid, orders, _ = ar_sandwich(Jf, r, layout[0], dof=dof)
                cov_free = A_inv @ Mid @ A_inv
                used = f"ar (orders {orders})" if any(orders) else "white"
            else:
                cov_free = sigma2 * A_inv
            cov_all = np.zeros((n_core, n_core))
            cov_all[np.ix_(free_core, free_core)] = cov_free
            cov_z = cov_all[:n_th, :n_th]
            cost = 0.5 * ssr
        scale = np.asarray(self.sim.scale).reshape(-1, ny)[0]
        if isinstance(self.loss, GaussianNLL):
            noise_std = np.exp(np.asarray(z[n_core:])) * scale
        else:
            noise_std = np.sqrt(np.sum(r.reshape(-1, ny) ** 2, axis=0) / max(N / ny - n_free / ny, 1))
            noise_std = noise_std * scale
        ident = np.ones(n_th, bool)
        pos = {int(c): k for k, c in enumerate(free_core)}
        for i in range(n_th):
            if i in pos and not ok_f[pos[i]]:
                ident[i] = False
        se_z = np.sqrt(np.clip(np.diag(cov_z), 0.0, None))
        se_z = np.where(ident, se_z, np.inf)
        se_z = np.where(fixed_theta, 0.0, se_z)
        cov = G[:, None] * cov_z * G[None, :]
        se = np.where(ident, np.sqrt(np.clip(np.diag(cov), 0.0, None)), np.inf)
        se = np.where(fixed_theta, 0.0, se)
        q = _t_quantile(dof)
        zt = np.asarray(z[:n_th])
        with np.errstate(invalid="ignore"):
            lo_z, hi_z = zt - q * se_z, zt + q * se_z
        ci_low = np.asarray(_physical_flat(self.sim, jnp.asarray(lo_z)))
        ci_high = np.asarray(_physical_flat(self.sim, jnp.asarray(hi_z)))
        ci_low = np.where(fixed_theta, est, ci_low)
        ci_high = np.where(fixed_theta, est, ci_high)
        if code is None:
            converged, message = False, "evaluated at the given parameters (no solver information)"
        else:
            converged, message = code == 0, result_message(code)
        names = list(self.space.names)
        if not ident.all():
            bad = [n for n, k in zip(names, ident, strict=True) if not k]
            why = (
                f"{N} residuals for {n_free} unknowns (no degrees of freedom)"
                if dof_raw <= 0
                else "the Jacobian of the residuals is rank-deficient in their direction (e.g. no excitation)"
            )
            warns.append(f"parameters {bad} are not identifiable from these data: {why}; their intervals are infinite")
            message += f"; NOT IDENTIFIABLE: {bad}"
            converged = False
        exact = ssr <= 1e-24 * max(N, 1)  # an exact fit: residuals at round-off carry no noise information
        if whiteness is not None and not whiteness.passed and not exact:
            warns.append(
                "residuals fail the whiteness test (lag-1 autocorrelation "
                f"{np.array2string(whiteness.lag1, precision=3)}, input cross-correlation "
                f"{'ok' if np.all(whiteness.independent) else 'significant'}): the model or noise description is "
                f"incomplete; intervals use the {used} covariance"
            )
        return {
            "z": z,
            "r": r,
            "ys": np.asarray(ys),
            "estimate": est,
            "cov": cov,
            "stderr": se,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "q": q,
            "dof": dof,
            "sigma2": float(sigma2),
            "cost": cost,
            "noise_std": noise_std,
            "n_samples": N,
            "n_steps": int(n_steps),
            "converged": converged,
            "message": message,
            "identifiable": ident,
            "fixed": fixed_theta,
            "covariance": used,
            "whiteness": whiteness,
            "warnings": warns,
        }

    def fit(
        self,
        *,
        solver="lm",
        rtol: float = 1e-10,
        atol: float = 1e-10,
        max_steps: int = 500,
        optimizer=None,
        steps: int = 2000,
        z0=None,
        n_starts: int = 1,
        starts=None,
        sampler=None,
        key=None,
        spread: float = 0.5,
        covariance: str = "auto",
        holdout=None,
        check_every: int = 10,
        patience: int = 3,
    ):
        """Solve from :attr:`theta0` (or ``z0``) and return the report of :meth:`result`.

        ``solver``: ``'lm'`` (default: :class:`pydso.LevenbergMarquardt` with ``rtol``/``atol`` through
        :func:`pydso.optimize.solve_least_squares`, at most ``max_steps`` steps; for :class:`GaussianNLL`, BFGS),
        a :class:`pydso.LevenbergMarquardt` / :class:`pydso.GaussNewton` object, ``'bfgs'``
        (:class:`optimistix.BFGS` on :meth:`objective`) or ``'optax'`` (``optimizer``, default Adam 1e-2, for
        ``steps`` steps). The same least-squares methods run step by step under :func:`pydso.minimize`.
        ``max_steps``, ``rtol`` and ``atol`` are traced: changing them does not recompile.

        **Multi-start:** ``n_starts`` / ``starts`` / ``sampler`` / ``key`` / ``spread`` (see
        :meth:`start_vectors`): all starts are solved as one vmapped compiled solve; the start with the lowest
        estimation loss is reported, every start's outcome is in ``result.multistart``.

        **Covariance:** ``'auto'`` (default: white unless the residuals fail the whiteness test, then the AR
        sandwich), ``'white'`` or ``'ar'``.

        **Early stopping** (for network weights): ``holdout`` a dataset; the solve runs ``check_every`` steps at
        a time, scores the simulation on ``holdout`` (initial state estimated from its first samples, see
        :meth:`SysIdResult.score`) and stops after ``patience`` checks without improvement, returning the
        parameters with the best holdout RMSE. Not with multi-start.
        """
        if covariance not in ("auto", "white", "ar"):
            raise SysIdError(f"covariance must be 'auto', 'white' or 'ar', got {covariance!r}")
        check_positive_int(n_starts, "n_starts", error=SysIdError)
        ms = None
        if holdout is not None:
            if n_starts > 1 or starts:
                raise SysIdError("holdout (early stopping) cannot be combined with multi-start")
            z, code, n_steps, gc = self._early_stopping(
                holdout, solver, rtol, atol, max_steps, z0, check_every, patience
            )
        elif n_starts > 1 or starts or sampler is not None:
            if not hasattr(self, "z_full"):
                raise SysIdError(
                    f"multi-start is not supported by {type(self).__name__}: fit the experiments one by one"
                )
            Z0 = self.start_vectors(n_starts=n_starts, starts=starts, sampler=sampler, key=key, spread=spread)
            if z0 is not None:
                Z0[0] = np.asarray(z0, float)
            z, code, n_steps, gc, ms = self._run_many(solver, rtol, atol, max_steps, optimizer, steps, Z0)
        else:
            z, code, n_steps, gc = self._run(solver, rtol, atol, max_steps, optimizer, steps, z0)
        res = self.result(z, n_steps=n_steps, code=code, covariance=covariance)
        res.multistart = ms
        self._stop_diagnostics(res, code, gc, max_steps)
        if holdout is not None:
            res.stop_reason = "early_stopping"
            res.message += f"; early stopping on the holdout data after {n_steps} steps"
        for w in res.warnings:
            warnings.warn(w, SysIdWarning, stacklevel=2)
        return res

    def _stop_diagnostics(self, res, code, gc, max_steps) -> None:
        """Record why the solver stopped and warn when it stopped away from a first-order optimum."""
        res.grad_cosine = gc
        name = RESULT_NAMES[code] if 0 <= code < len(RESULT_NAMES) else "unknown"
        if code == 0:
            res.stop_reason = "gradient_tolerance" if np.isfinite(gc) and gc <= 1e-8 else "step_function_tolerance"
        else:
            res.stop_reason = name
        if code == 1:
            res.message = f"max_steps reached ({max_steps} steps; optimistix.RESULTS.max_steps_reached)"
        if np.isfinite(gc) and gc > 1e-4 and res.cost > 1e-20:
            w = (
                f"the solver stopped ({res.stop_reason}) where the gradient is not small relative to the cost "
                f"(gradient cosine {gc:.2g} > 1e-04): not a first-order optimum; try more steps, tighter tolerances, "
                "a multi-start (n_starts=...) or multiple shooting"
            )
            res.warnings = (*res.warnings, w)
            res.message += "; gradient not small"
            res.converged = False

    def _early_stopping(self, holdout, solver, rtol, atol, max_steps, z0, check_every, patience):
        check_positive_int(check_every, "check_every", error=SysIdError)
        check_positive_int(patience, "patience", error=SysIdError)
        z = self.theta0 if z0 is None else jnp.asarray(z0, float)
        best = (np.inf, z)
        bad, total, code, gc = 0, 0, 1, float("nan")
        while total < max_steps:
            k = min(check_every, max_steps - total)
            z, code, n, gc = self._run(solver, rtol, atol, k, None, 0, z)
            total += max(n, 1)
            res = self.result(z, n_steps=total, code=code, covariance="white")
            val = float(np.mean(res.score(holdout).rmse))
            if val < best[0]:
                best, bad = (val, z), 0
            else:
                bad += 1
            if bad >= patience or code == 0:
                break
        return best[1], code, total, gc


class SysIdProblem(AbstractSysIdProblem):
    r"""A system-identification problem: a model, data, a loss and the parameter space — a least-squares DSO
    problem (:class:`pydso.optimize.AbstractLeastSquares`).

    ``theta`` is the unconstrained vector ``[parameters (transformed) | initial states (episode, state) if
    estimated | segment states (multiple shooting) | log noise std per output (NLL)]``, :attr:`theta0` its start;
    :meth:`residuals` is the residual vector of the loss. Solve with :meth:`fit`, or with
    ``pydso.minimize(problem, problem.theta0, key=key, method=pydso.LevenbergMarquardt(), steps=...)`` and then
    :meth:`result`. Compiled solves are shared by all problems of the same model object, loss and data shapes:
    fitting many experiments of the same shape compiles once.

    **Arguments:** ``model`` (:class:`~pydso.problems.sysid.ContinuousModel` / ``DiscreteModel``), ``data`` (a
    pydso dataset with ``input`` and ``output``), ``loss`` (name or loss object), ``params`` / ``x0`` /
    ``transforms`` (override the model's initial guesses), ``output_scale`` (default: the standard deviation of
    each output).
    """

    sim: Simulator
    loss: object = eqx.field(static=True)
    theta0: jax.Array
    extra: dict
    n_episodes: int = eqx.field(static=True)
    n_samples: int = eqx.field(static=True)
    n_outputs: int = eqx.field(static=True)
    n_inputs: int = eqx.field(static=True)
    n_seg: int = eqx.field(static=True)
    n_segments: int = eqx.field(static=True)
    segment_length: int = eqx.field(static=True)
    z_full: jax.Array
    free_idx: tuple | None = eqx.field(static=True)
    reg_idx: tuple = eqx.field(static=True)
    reg_w: jax.Array

    def __init__(
        self,
        model,
        data,
        *,
        loss="simulation",
        params=None,
        x0=None,
        output_scale=None,
        transforms=None,
        fixed=None,
        regularization=None,
    ):
        if not isinstance(model, StateSpaceModel):
            raise SysIdError(f"model must be a ContinuousModel or DiscreteModel, got {type(model).__name__}")
        self.loss = as_loss(loss)
        u, y, ts, dt, xs = extract_arrays(data, model)
        E, T, ny = y.shape
        nu = u.shape[-1]
        self.n_episodes, self.n_samples, self.n_outputs, self.n_inputs = E, T, ny, nu
        nx = model.n_states
        tf = dict(model.transforms if transforms is None else transforms)
        x0_tf = {k: tf.pop(k) for k in list(tf) if k == "x0" or k.startswith("x0[")}
        x0_specs = []
        for i in range(nx):
            spec = x0_tf.get(f"x0[{i}]", x0_tf.get("x0"))
            transform_pair(spec, f"x0[{i}]")  # validates the spec
            x0_specs.append(tuple(spec) if isinstance(spec, list) else spec)
        bad_x0 = [k for k in x0_tf if k != "x0" and k not in {f"x0[{i}]" for i in range(nx)}]
        if bad_x0:
            raise SysIdError(f"transforms for unknown initial states {bad_x0}; the model has x0[0]..x0[{nx - 1}]")
        if isinstance(params, dict) and isinstance(model.params, dict):
            unknown = set(params) - set(model.params)
            if unknown:
                raise SysIdError(
                    f"params names unknown parameters {sorted(unknown)}; the model has {sorted(model.params)}"
                )
            params = {**model.params, **params}  # a partial guess overrides the model's
        space = ParamSpace(model.params if params is None else params, tf)
        theta0 = space.unflatten(space.z0)
        x0a = model.x0 if x0 is None else np.asarray(x0, float)
        if x0a.shape[-1:] != (nx,) or x0a.ndim > 2 or (x0a.ndim == 2 and x0a.shape[0] not in (1, E)):
            raise SysIdError(f"x0 has shape {x0a.shape}; expected ({nx},) or ({E}, {nx}) (episodes, states)")
        check_finite_guess(x0a, "x0")
        x0g = np.broadcast_to(x0a, (E, nx)).copy()
        # model dimension checks (by abstract evaluation: no compile)
        try:
            out = jax.eval_shape(lambda x, uu: model.output(x, uu, theta0), jnp.zeros(nx), jnp.zeros(nu))
            fx = model.derivative_shape(theta0, nx, nu)
        except SysIdError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SysIdError(
                f"calling model {model.name!r} with a state of size {nx} and an input of size {nu} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        if out.shape != (ny,):
            raise SysIdError(
                f"model output dimension mismatch: h returns shape {out.shape}, the dataset 'output' has "
                f"{ny} channel(s)"
            )
        if fx != (nx,):
            raise SysIdError(f"model f returns shape {fx}, expected the state shape {(nx,)}")
        if output_scale is None:
            scale = np.std(y.reshape(-1, ny), axis=0)
            scale = np.where(scale > 0, scale, 1.0)
        else:
            scale = np.broadcast_to(np.asarray(output_scale, float), (ny,))
            if np.any(~(scale > 0)):
                raise SysIdError(f"output_scale must be positive, got {output_scale!r}")
        self.sim = Simulator(
            model=model,
            space=space,
            u=jnp.asarray(u),
            y=jnp.asarray(y),
            t0=jnp.asarray(ts[0], float),
            dt=jnp.asarray(dt, float),
            scale=jnp.asarray(scale, float),
            x0=jnp.asarray(x0g),
            x0_specs=tuple(x0_specs),
        )
        # state initialisation from data (prediction losses, multiple-shooting segments)
        xdata = None
        if xs is not None:
            xdata = xs
        elif model.state_from_output is not None:
            xdata = np.stack([np.asarray(model.state_from_output(y[e], u[e], dt), float) for e in range(E)])
            if xdata.shape != (E, T, nx):
                raise SysIdError(f"state_from_output returned shape {xdata.shape[1:]} per episode, expected {(T, nx)}")
        extra: dict = {}
        z_parts = [space.z0]
        if model.estimate_x0:
            x0z = np.stack(
                [np.asarray(transform_pair(spec, f"x0[{i}]")[1](x0g[:, i])) for i, spec in enumerate(x0_specs)],
                axis=-1,
            )
            z_parts.append(jnp.asarray(x0z).ravel())
        lo = self.loss
        self.n_seg, self.n_segments, self.segment_length = 0, 0, 0
        if isinstance(lo, MultipleShooting):
            L = lo.segment_length
            S = max(1, math.ceil((T - 1) / L))
            self.n_segments, self.segment_length = S, L
            pad = S * L + 1 - T
            mask = np.ones((E, S * L + 1))
            mask[:, T:] = 0.0
            up = np.concatenate([u, np.repeat(u[:, -1:], pad, axis=1)], axis=1)
            yp = np.concatenate([y, np.zeros((E, pad, ny))], axis=1)
            tp = ts[0] + dt * np.arange(S * L + 1)
            extra.update(u_ms=jnp.asarray(up), y_ms=jnp.asarray(yp), m_ms=jnp.asarray(mask), t_ms=jnp.asarray(tp))
            init = lo.init
            if init == "auto":
                init = "data" if xdata is not None else "simulate"
            if init == "data":
                if xdata is None:
                    raise SysIdError(
                        "MultipleShooting(init='data') needs a measured 'state' of the model's size or "
                        "model.state_from_output"
                    )
                starts = xdata[:, L : (S - 1) * L + 1 : L] if S > 1 else np.zeros((E, 0, nx))
            else:
                states = simulate_states(
                    model, theta0, jnp.asarray(x0g), jnp.asarray(up), dt=jnp.asarray(dt), t0=jnp.asarray(tp[0])
                )
                starts = np.asarray(states)[:, L : (S - 1) * L + 1 : L]
            starts = np.asarray(starts).reshape(E, S - 1, nx)
            sc = np.std(starts.reshape(-1, nx), axis=0) if S > 2 else np.ones(nx)
            sc = np.where(np.isfinite(sc) & (sc > 0), sc, 1.0)
            extra["xscale"] = jnp.asarray(sc)
            extra["wc"] = jnp.asarray(math.sqrt(lo.weight))
            z_parts.append(jnp.asarray(starts).ravel())
            self.n_seg = E * (S - 1) * nx
        elif isinstance(lo, Prediction):
            if xdata is None:
                raise SysIdError(
                    "the prediction loss needs states from the data: a 'state' variable with the model's "
                    f"{nx} state(s), or model.state_from_output(y, u, dt)"
                )
            if lo.k >= T:
                raise SysIdError(f"Prediction.k = {lo.k} must be smaller than the record length {T}")
            extra["xd"] = jnp.asarray(xdata)
            extra["ts"] = jnp.asarray(ts, float)
        elif isinstance(lo, GaussianNLL):
            z_parts.append(jnp.zeros(ny))  # log noise std in scaled units
        self.extra = extra
        z_full = jnp.concatenate(z_parts)
        fixed_idx, z_full = _fixed_entries(fixed, space, model, E, z_full, x0_specs)
        self.z_full = z_full
        if fixed_idx:
            self.free_idx = tuple(int(i) for i in np.setdiff1d(np.arange(z_full.shape[0]), fixed_idx))
            self.theta0 = z_full[np.asarray(self.free_idx, dtype=np.int64)]
        else:
            self.free_idx = None
            self.theta0 = z_full
        self.reg_idx, self.reg_w = _regularization(regularization, space)

    # ---- sizes
    @property
    def n_theta(self) -> int:
        return self.sim.n_theta

    @property
    def n_x0(self) -> int:
        return self.sim.n_x0

    # ---- the residuals of the loss
    def residuals(self, theta):
        r"""Residual vector of the loss at the unconstrained vector ``theta`` (its free entries; 1-D, traceable),
        followed by the regularisation residuals :math:`\sqrt{\lambda_i}\,\theta_i` if any."""
        r = self._loss_residuals(self.expand(theta))
        if self.reg_idx:
            phys = self.space.physical_flat(self.expand(theta)[: self.n_theta])
            r = jnp.concatenate([r, self.reg_w * phys[np.asarray(self.reg_idx, dtype=np.int64)]])
        return r

    def _residual_layout(self):
        return (self.n_episodes, self.n_samples, self.n_outputs), np.asarray(self.sim.u)

    def _loss_residuals(self, z):
        lo, model, sim = self.loss, self.sim.model, self.sim
        if isinstance(lo, Simulation):
            return sim.residuals(z[: self.n_core])
        if isinstance(lo, GaussianNLL):
            self._check_least_squares()
        theta_p, x0 = sim.theta_x0(z)
        dt = sim.dt
        if isinstance(lo, MultipleShooting):
            S, L, E, nx = self.n_segments, self.segment_length, self.n_episodes, model.n_states
            off = self.n_core
            mids = z[off : off + self.n_seg].reshape(E, S - 1, nx)
            starts = jnp.concatenate([x0[:, None, :], mids], axis=1)  # (E,S,nx)
            idx = np.arange(S)[:, None] * L + np.arange(L + 1)[None, :]  # (S, L+1)
            u_seg = self.extra["u_ms"][:, idx]  # (E,S,L+1,nu)
            t_seg = self.extra["t_ms"][idx[:, 0]]  # (S,)

            def segment(x, u, t0):
                return simulate_outputs(model, theta_p, x, u, dt=dt, t0=t0)

            ys, xs = jax.vmap(segment, in_axes=(1, 1, 0), out_axes=1)(starts, u_seg, t_seg)  # (E,S,L+1,.)
            y_seg = self.extra["y_ms"][:, idx[:, :-1]]
            m_seg = self.extra["m_ms"][:, idx[:, :-1]][..., None]
            r_out = ((ys[:, :, :L] - y_seg) / sim.scale * m_seg).ravel()
            r_cont = (self.extra["wc"] * (xs[:, :-1, L] - mids) / self.extra["xscale"]).ravel()
            return jnp.concatenate([r_out, r_cont])
        if isinstance(lo, Prediction):
            k, T = lo.k, self.n_samples
            starts = np.arange(T - k)
            idx = starts[:, None] + np.arange(k + 1)[None, :]  # (N, k+1)

            def window(x, u, t0):
                return simulate_outputs(model, theta_p, x, u, dt=dt, t0=t0)[0][:, 1:]

            xs = self.extra["xd"][:, starts]  # (E,N,nx)
            pred = jax.vmap(window, in_axes=(1, 1, 0), out_axes=1)(
                xs, sim.u[:, idx], self.extra["ts"][starts]
            )  # (E,N,k,ny)
            yt = sim.y[:, idx[:, 1:]]
            return ((pred - yt) / sim.scale).ravel()
        raise SysIdError(f"unsupported loss {lo!r}")

    # ---- report
    def result(
        self, theta, *, n_steps: int = 0, code: int | None = None, covariance: str = "auto", precomputed=None
    ) -> SysIdResult:
        """The identification report at the unconstrained vector ``theta`` (e.g. ``pydso.minimize(...).theta``):
        physical estimates, covariance, 95% intervals, identifiability, residual whiteness and fit metrics.
        ``code`` (0 successful, 1 max steps, else the optimistix failure, see
        :data:`pydso.optimize.RESULT_NAMES`; None: unknown) and ``n_steps`` record how ``theta`` was obtained;
        ``covariance`` as for :meth:`fit`; ``precomputed``: the covariance pass's arrays if already computed
        (batched fits)."""
        s = self._summary(theta, n_steps, code, covariance, precomputed)
        z, est, se = s["z"], s["estimate"], s["stderr"]
        y = np.asarray(self.sim.y)
        rmse, nrmse, fitp = fit_metrics(s["ys"], y)
        theta_p, x0 = _theta_x0(self.sim, jnp.asarray(z[: self.n_core]))
        return SysIdResult(
            names=list(self.space.names),
            estimate=est,
            stderr=se,
            ci_low=s["ci_low"],
            ci_high=s["ci_high"],
            cov=s["cov"],
            params=jax.tree.map(lambda v: np.asarray(v) if eqx.is_array(v) else v, theta_p),
            x0=np.asarray(x0),
            sigma2=s["sigma2"],
            rmse=rmse,
            nrmse=nrmse,
            fit_percent=fitp,
            cost=s["cost"],
            n_steps=s["n_steps"],
            converged=s["converged"],
            message=s["message"],
            loss=self.loss.name,
            y_sim=s["ys"],
            n_samples=s["n_samples"],
            dof=s["dof"],
            noise_std=s["noise_std"],
            model=self.sim.model,
            fixed=s["fixed"],
            identifiable=s["identifiable"],
            covariance=s["covariance"],
            whiteness=s["whiteness"],
            warnings=tuple(s["warnings"]),
        )


def _scalar_index(space, name):
    """Indices (in the parameter block) of the scalar parameter or leaf called ``name``; None if unknown."""
    names = list(space.names)
    if name in names:
        return [names.index(name)]
    hits = [i for i, n in enumerate(names) if n.startswith(name + "[") or n.startswith(name + ".")]
    return hits or None


def _fixed_entries(fixed, space, model, E, z_full, x0_specs):
    """``(indices, z_full)``: the entries of the full unconstrained vector held fixed and the vector with their
    values set. ``fixed``: a list of names (held at their guesses) or a dict ``{name: physical value}``; names
    are parameter leaves (``'k'``, ``'net'``), scalar names (``'A[0]'``), ``'x0'`` (all initial states) or
    ``'x0[i]'`` (state ``i`` of every episode)."""
    if fixed is None or (hasattr(fixed, "__len__") and len(fixed) == 0):
        return [], z_full
    if isinstance(fixed, str):
        fixed = [n.strip() for n in fixed.split(",") if n.strip()]
    items = fixed.items() if isinstance(fixed, dict) else ((n, None) for n in fixed)
    z = np.asarray(z_full, float).copy()
    nx, nth = model.n_states, space.size
    idx = []
    for name, value in items:
        if not isinstance(name, str):
            raise SysIdError(f"fixed: names must be strings, got {name!r}")
        if name == "x0" or name.startswith("x0["):
            if not model.estimate_x0:
                raise SysIdError(f"fixed names {name!r}, but the model does not estimate its initial states")
            states = list(range(nx)) if name == "x0" else [int(name[3:-1])] if name[3:-1].isdigit() else []
            if not states or states[-1] >= nx:
                raise SysIdError(f"fixed names unknown initial state {name!r}; the model has x0[0]..x0[{nx - 1}]")
            block = z[nth : nth + E * nx].reshape(E, nx)
            if value is not None:
                arr = np.asarray(value, float)
                if arr.ndim <= 1 and arr.size == len(states):
                    v = np.broadcast_to(arr.reshape(1, -1), (E, len(states)))
                elif arr.ndim == 1 and arr.size == E and len(states) == 1:
                    v = arr.reshape(E, 1)
                elif arr.shape == (E, len(states)):
                    v = arr
                else:
                    raise SysIdError(
                        f"fixed[{name!r}] has shape {arr.shape}; expected ({len(states)},) or ({E}, {len(states)}) "
                        "(episodes, states)"
                    )
                check_finite_guess(v, name)
                for k, i in enumerate(states):
                    block[:, i] = np.asarray(transform_pair(x0_specs[i], f"x0[{i}]")[1](np.asarray(v)[:, k]))
            z[nth : nth + E * nx] = block.ravel()
            idx += [nth + e * nx + i for e in range(E) for i in states]
            continue
        hit = _scalar_index(space, name)
        if hit is None:
            raise SysIdError(
                f"fixed names unknown parameter {name!r}; have {list(space.leaf_names)} (or scalar names such as "
                f"{list(space.names)[:3]}, 'x0', 'x0[i]')"
            )
        if value is not None:
            v = np.broadcast_to(
                np.asarray(value, float).ravel() if np.ndim(value) else np.asarray(value, float), (len(hit),)
            )
            check_finite_guess(v, name)
            for k, i in enumerate(hit):
                leaf = _leaf_of(space, i)
                z[i] = float(np.asarray(transform_pair(space.specs[leaf], space.leaf_names[leaf])[1](v[k])))
        idx += hit
    return sorted(set(idx)), jnp.asarray(z)


def _leaf_of(space, i):
    """The leaf index of scalar parameter ``i``."""
    return int(np.searchsorted(np.cumsum(space.sizes), i, side="right"))


def _regularization(regularization, space):
    """``(indices, sqrt weights)`` of the L2 weight regularisation ``{name: lambda}`` (leaf or scalar names)."""
    if not regularization:
        return (), jnp.zeros(0)
    idx, w = [], []
    for name, lam in dict(regularization).items():
        hit = _scalar_index(space, name)
        if hit is None:
            raise SysIdError(f"regularization names unknown parameter {name!r}; have {list(space.leaf_names)}")
        if not (isinstance(lam, int | float) and lam >= 0 and math.isfinite(lam)):
            raise SysIdError(f"regularization[{name!r}] must be a finite weight >= 0, got {lam!r}")
        idx += hit
        w += [math.sqrt(lam)] * len(hit)
    return tuple(idx), jnp.asarray(w, float)


def fit_metrics(ys, y):
    """RMSE, NRMSE and fit percentage per output channel of simulated outputs ``ys`` against data ``y``
    (arrays ``(..., time, output)``)."""
    ny = y.shape[-1]
    err = (ys - y).reshape(-1, ny)
    yc = (y - y.mean(axis=tuple(range(y.ndim - 1)))).reshape(-1, ny)
    rmse = np.sqrt(np.mean(err**2, axis=0))
    std = np.sqrt(np.mean(yc**2, axis=0))
    nrmse = rmse / np.where(std > 0, std, 1.0)
    fitp = 100.0 * (1.0 - np.linalg.norm(err, axis=0) / np.where(std > 0, np.linalg.norm(yc, axis=0), 1.0))
    return rmse, nrmse, fitp


def sysid(
    model,
    data,
    *,
    loss="simulation",
    params=None,
    x0=None,
    output_scale=None,
    transforms=None,
    fixed=None,
    regularization=None,
):
    r"""The problem constructor of system identification: a :class:`SysIdProblem` (see :mod:`pydso.problems`
    for the contract: ``.theta0``, ``.residuals``, ``.result``; solve with ``.fit()`` or :func:`pydso.minimize`).

    ``fixed``: parameters (or initial states) held at given values without rewriting the model — a list of
    names (held at their guesses) or ``{name: value}`` (physical values); names are parameter leaves (``'k'``),
    scalar names (``'A[0]'``), ``'x0'`` or ``'x0[i]'``. ``transforms`` may also name initial states (``'x0'``,
    ``'x0[i]'``: ``'positive'``, ``(lower, upper)``, ...). ``regularization``: ``{name: lambda}`` adds the
    residuals :math:`\sqrt\lambda\,\theta` (L2 weight decay, e.g. for network weights; the covariance still
    uses the simulation residuals only)."""
    return SysIdProblem(
        model,
        data,
        loss=loss,
        params=params,
        x0=x0,
        output_scale=output_scale,
        transforms=transforms,
        fixed=fixed,
        regularization=regularization,
    )


def fit(
    model,
    data,
    *,
    loss="simulation",
    params=None,
    x0=None,
    output_scale=None,
    transforms=None,
    fixed=None,
    regularization=None,
    solver="lm",
    **solver_options,
) -> SysIdResult:
    """Identify ``model`` from ``data`` (a pydso dataset): build the problem and solve it.

    ``loss``: ``'simulation'`` (default), ``'multiple-shooting'``, ``'prediction'``, ``'nll'`` or a loss object
    (:class:`Simulation`, :class:`MultipleShooting`, :class:`Prediction`, :class:`GaussianNLL`). ``params`` /
    ``x0`` / ``transforms`` override the model's initial guesses. ``solver``: ``'lm'`` (default), ``'bfgs'``,
    ``'optax'`` or a :class:`pydso.LevenbergMarquardt` / :class:`pydso.GaussNewton` object; further keywords go
    to :meth:`SysIdProblem.fit` (``n_starts``/``starts``/``sampler``/``key`` multi-start, ``max_steps``,
    ``rtol``/``atol``, ``covariance``, ``holdout`` early stopping). ``fixed`` / ``regularization``: see
    :func:`sysid`.
    """
    prob = sysid(
        model,
        data,
        loss=loss,
        params=params,
        x0=x0,
        output_scale=output_scale,
        transforms=transforms,
        fixed=fixed,
        regularization=regularization,
    )
    return prob.fit(solver=solver, **solver_options)


def _with_data(base: SysIdProblem, data, output_scale, what: str) -> SysIdProblem:
    """``base`` with the input/output arrays of ``data`` (same shapes; a simulation-loss problem)."""
    u, y, ts, dt, _ = extract_arrays(data, base.model)
    if u.shape != tuple(base.sim.u.shape) or y.shape != tuple(base.sim.y.shape):
        raise SysIdError(
            f"fit_batch: {what} has input {u.shape} / output {y.shape}, the first experiment "
            f"{tuple(base.sim.u.shape)} / {tuple(base.sim.y.shape)}: experiments must have equal shapes"
        )
    ny = y.shape[-1]
    if output_scale is None:
        scale = np.std(y.reshape(-1, ny), axis=0)
        scale = np.where(scale > 0, scale, 1.0)
    else:
        scale = np.broadcast_to(np.asarray(output_scale, float), (ny,))
    sim = eqx.tree_at(
        lambda s: (s.u, s.y, s.t0, s.dt, s.scale),
        base.sim,
        (jnp.asarray(u), jnp.asarray(y), jnp.asarray(ts[0], float), jnp.asarray(dt, float), jnp.asarray(scale)),
    )
    return eqx.tree_at(lambda p: p.sim, base, sim)


def fit_batch(
    model,
    data,
    *,
    params=None,
    x0=None,
    output_scale=None,
    transforms=None,
    fixed=None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 500,
    covariance: str = "auto",
) -> list[SysIdResult]:
    """Many independent identifications of one model, as **one** compiled, vmapped Levenberg–Marquardt solve
    (:func:`pydso.optimize.solve_least_squares_many`) and one vmapped covariance pass: each episode of ``data``
    (a pydso dataset), or each dataset of a list of equal-shape datasets, is its own experiment with its own
    parameters. Simulation-error loss; the other arguments as for :func:`fit`.

    **Returns:** one :class:`SysIdResult` per experiment (the same report :func:`fit` gives, without
    warnings being emitted: they are in ``result.warnings``). For experiments of different shapes use
    :func:`fit_many` (Dask) instead.
    """
    import xarray as xr

    if covariance not in ("auto", "white", "ar"):
        raise SysIdError(f"covariance must be 'auto', 'white' or 'ar', got {covariance!r}")
    if isinstance(data, xr.Dataset):
        n = int(data.sizes.get("episode", 1))
        datasets = [data.isel(episode=[e]) for e in range(n)]
    else:
        datasets = list(data)
    if not datasets:
        raise SysIdError("fit_batch: no experiments given")
    base = SysIdProblem(
        model, datasets[0], params=params, x0=x0, output_scale=output_scale, transforms=transforms, fixed=fixed
    )
    probs = [base] + [_with_data(base, d, output_scale, f"experiment {i}") for i, d in enumerate(datasets[1:], 1)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *probs)
    Z0 = jnp.broadcast_to(base.theta0, (len(probs), base.theta0.shape[0]))
    method = LevenbergMarquardt(rtol, atol)
    sol = solve_least_squares_many(stacked, Z0, method=method, max_steps=max_steps)
    Z = np.asarray(sol.theta)
    Zfull = jax.vmap(base.expand)(jnp.asarray(Z)) if base.free_index is not None else jnp.asarray(Z)
    passes = [np.asarray(a) for a in _covariance_pass_many(stacked.sim, Zfull[:, : base.n_core])]
    codes, steps, gcs = np.asarray(sol.code), np.asarray(sol.num_steps), np.asarray(sol.grad_cosine)
    out = []
    for e, p in enumerate(probs):
        res = p.result(
            Z[e],
            n_steps=int(steps[e]),
            code=int(codes[e]),
            covariance=covariance,
            precomputed=tuple(a[e] for a in passes),
        )
        p._stop_diagnostics(res, int(codes[e]), float(gcs[e]), max_steps)
        out.append(res)
    return out
