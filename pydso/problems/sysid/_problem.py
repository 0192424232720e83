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
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ..._errors import DivergenceError
from ..._typing import PyTree
from ...optimize import AbstractLeastSquares, LevenbergMarquardt, solve_least_squares
from ...optimize._least_squares import RESULT_MESSAGES, AbstractGaussNewtonMethod
from .._contract import AbstractConstructedProblem
from ._data import extract_arrays
from ._errors import SysIdError
from ._losses import GaussianNLL, MultipleShooting, Prediction, Simulation, as_loss
from ._models import StateSpaceModel, simulate, simulate_outputs, simulate_states
from ._transforms import ParamSpace

__all__ = ["SysIdResult", "Simulator", "AbstractSysIdProblem", "SysIdProblem", "fit_metrics", "sysid", "fit"]


@dataclasses.dataclass
class SysIdResult:
    """Outcome of :func:`fit`: physical estimates with standard errors, 95% intervals and fit metrics.

    ``names``/``estimate``/``stderr``/``ci_low``/``ci_high`` are per scalar parameter (flattened pytree);
    ``params`` is the estimate as the model's pytree; ``x0`` the initial states (episode, state);
    ``rmse``/``nrmse``/``fit_percent`` are per output channel of the free-run simulation (physical units);
    ``y_sim`` the simulated outputs (episode, time, output); ``noise_std`` the estimated measurement noise
    std per output (physical units: the NLL estimate for :class:`GaussianNLL`, else the residual RMS corrected
    for the degrees of freedom).
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

    def simulate(self, model, u, *, dt: float, x0=None) -> np.ndarray:
        """Simulate ``model`` with the estimated parameters on a new input (default ``x0``: first episode's)."""
        return simulate(model, self.params, u, dt=dt, x0=self.x0[0] if x0 is None else x0)

    def as_dict(self) -> dict:
        """``{name: estimate}`` of the scalar parameters."""
        return {n: float(v) for n, v in zip(self.names, self.estimate, strict=True)}

    def summary(self) -> str:
        lines = [f"{'parameter':>14} {'estimate':>13} {'stderr':>11} {'95% CI':>27}"]
        for n, e, s, lo, hi in zip(self.names, self.estimate, self.stderr, self.ci_low, self.ci_high, strict=True):
            lines.append(f"{n:>14} {e:13.6g} {s:11.3g}   [{lo:11.5g}, {hi:11.5g}]")
        lines.append(
            f"loss={self.loss} converged={self.converged} steps={self.n_steps} "
            f"RMSE={np.array2string(self.rmse, precision=4)} NRMSE={np.array2string(self.nrmse, precision=4)} "
            f"fit%={np.array2string(self.fit_percent, precision=2)}"
        )
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


@eqx.filter_jit
def _covariance_pass(sim, zc):
    """Simulation residuals, their Jacobian, simulated outputs, the transform Jacobian and the physical
    parameters at the core vector ``zc`` (compiled once per simulator structure: shared by all losses)."""
    r = sim.residuals(zc)
    J = jax.jacfwd(sim.residuals)(zc)
    ys = sim.outputs(zc)
    zt = zc[: sim.n_theta]
    G = jax.jvp(sim.physical_flat, (zt,), (jnp.ones_like(zt),))[1]  # transforms act elementwise
    return r, J, ys, G, sim.physical_flat(zt)


@eqx.filter_jit
def _nll_hessian(problem, z):
    return jax.hessian(problem.objective)(z)


@eqx.filter_jit
def _bfgs(problem, z0, rtol, atol, max_steps):
    sol = optx.minimise(
        lambda z, p: p.objective(z), optx.BFGS(rtol=rtol, atol=atol), z0, args=problem, max_steps=max_steps, throw=False
    )
    code = jnp.where(
        sol.result == optx.RESULTS.successful, 0, jnp.where(sol.result == optx.RESULTS.max_steps_reached, 1, 2)
    )
    return sol.value, code, sol.stats["num_steps"]


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

    def simulate_outputs(self, z):
        """Free-run simulated outputs at the (core) unconstrained vector ``z``."""
        return self.sim.outputs(z[: self.n_core])

    def simulation_residuals(self, z):
        """Scaled free-run simulation residuals at the (core) unconstrained vector ``z``."""
        return self.sim.residuals(z[: self.n_core])

    def objective(self, z):
        r""":math:`\tfrac12\|r(z)\|^2`, or for :class:`GaussianNLL` the negative log-likelihood
        :math:`\sum 0.5 (r e^{-\ell})^2 + \ell` with the log noise levels :math:`\ell` (scaled units) at the end
        of ``z``."""
        if isinstance(self.loss, GaussianNLL):
            ny = self.sim.scale.shape[-1]
            r = self.sim.residuals(z[: self.n_core]).reshape(-1, ny)
            ls = z[self.n_core :]
            return jnp.sum(0.5 * (r * jnp.exp(-ls)) ** 2 + ls)
        return 0.5 * jnp.sum(self.residuals(z) ** 2)

    def _check_least_squares(self):
        if isinstance(self.loss, GaussianNLL):
            raise SysIdError(
                "the Gaussian NLL loss is not a least-squares objective (its noise levels are estimated): fit it "
                "with solver='bfgs', or minimise problem.objective"
            )

    # ---- solving
    def _run(self, solver, rtol, atol, max_steps, optimizer, steps, z0):
        """``(z, result code, n_steps)`` of the chosen solver from ``z0``."""
        z0 = self.theta0 if z0 is None else jnp.asarray(z0, float)
        if z0.shape != self.theta0.shape:
            raise SysIdError(f"z0 has shape {z0.shape}, expected {self.theta0.shape} (see problem.theta0)")
        is_nll = isinstance(self.loss, GaussianNLL)
        if isinstance(solver, AbstractGaussNewtonMethod) or (solver == "lm" and not is_nll):
            method = solver if isinstance(solver, AbstractGaussNewtonMethod) else LevenbergMarquardt(rtol, atol)
            sol = solve_least_squares(self, z0, method=method, max_steps=max_steps)
            return sol.theta, int(sol.code), int(sol.num_steps)
        if solver in ("lm", "bfgs"):
            z, code, n = _bfgs(self, z0, rtol, atol, max_steps)
            return z, int(code), int(n)
        if solver == "optax":
            import optax

            opt = optimizer if optimizer is not None else optax.adam(1e-2)
            return _optax(self, z0, opt, steps), 0, steps
        raise SysIdError(
            f"unknown solver {solver!r}: use 'lm', 'bfgs', 'optax' or a pydso.LevenbergMarquardt/GaussNewton object"
        )

    def _summary(self, z, n_steps, code) -> dict:
        """The covariance of the parameter block ``z[:n_theta]`` in physical units (``sigma^2 (J^T J)^-1`` of the
        simulation residuals over ``z[:n_theta + n_x0]``, or the inverse observed information for
        :class:`GaussianNLL`, mapped by the delta method), the noise level and the fit metrics' inputs."""
        z = jnp.asarray(z)
        n_core = self.n_core
        r, J, ys, G, est = _covariance_pass(self.sim, z[:n_core])
        r, J, G, est = (np.asarray(a) for a in (r, J, G, est))
        finite = bool(np.all(np.isfinite(np.asarray(z)))) and bool(np.all(np.isfinite(r)))
        if not finite:
            raise DivergenceError(
                f"sysid fit of model {self.sim.model.name!r} diverged (non-finite parameters or simulation); "
                "try multiple shooting, a better initial guess or parameter transforms"
            )
        ny = self.sim.scale.shape[-1]
        n_th = self.n_theta
        N = r.size
        dof = max(N - n_core, 1)
        ssr = float(r @ r)
        sigma2 = ssr / dof
        if isinstance(self.loss, GaussianNLL):
            Hn = np.asarray(_nll_hessian(self, z))
            try:
                cov_full = np.linalg.pinv(Hn, hermitian=True)
            except np.linalg.LinAlgError:
                cov_full = np.full_like(Hn, np.nan)
            cov_z = cov_full[:n_th, :n_th]
            ls = np.asarray(z[n_core:])
            cost = float(np.sum(0.5 * (r.reshape(-1, ny) * np.exp(-ls)) ** 2 + ls))
        else:
            cn = np.linalg.norm(J, axis=0)
            cn = np.where(cn > 0, cn, 1.0)
            Js = J / cn  # scaled: the inverse is then well defined to machine precision
            try:
                cov_all = sigma2 * np.linalg.pinv(Js.T @ Js, rcond=1e-13, hermitian=True) / np.outer(cn, cn)
            except np.linalg.LinAlgError:
                cov_all = np.full((J.shape[1], J.shape[1]), np.nan)
            cov_z = cov_all[:n_th, :n_th]
            cost = 0.5 * ssr
        scale = np.asarray(self.sim.scale).reshape(-1, ny)[0]
        if isinstance(self.loss, GaussianNLL):
            noise_std = np.exp(np.asarray(z[n_core:])) * scale
        else:
            noise_std = np.sqrt(np.sum(r.reshape(-1, ny) ** 2, axis=0) / max(N / ny - n_core / ny, 1))
            noise_std = noise_std * scale
        cov = G[:, None] * cov_z * G[None, :]
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        from scipy import stats

        q = float(stats.t.ppf(0.975, dof))
        if code is None:
            converged, message = False, "evaluated at the given parameters (no solver information)"
        else:
            converged, message = code == 0, RESULT_MESSAGES.get(code, f"solver result code {code}")
        return {
            "z": z,
            "r": r,
            "ys": np.asarray(ys),
            "estimate": est,
            "cov": cov,
            "stderr": se,
            "q": q,
            "dof": dof,
            "sigma2": float(sigma2),
            "cost": cost,
            "noise_std": noise_std,
            "n_samples": N,
            "n_steps": int(n_steps),
            "converged": converged,
            "message": message,
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
    ):
        """Solve from :attr:`theta0` (or ``z0``) and return the report of :meth:`result`.

        ``solver``: ``'lm'`` (default: :class:`pydso.LevenbergMarquardt` with ``rtol``/``atol`` through
        :func:`pydso.optimize.solve_least_squares`, at most ``max_steps`` steps; for :class:`GaussianNLL`, BFGS),
        a :class:`pydso.LevenbergMarquardt` / :class:`pydso.GaussNewton` object, ``'bfgs'``
        (:class:`optimistix.BFGS` on :meth:`objective`) or ``'optax'`` (``optimizer``, default Adam 1e-2, for
        ``steps`` steps). The same least-squares methods run step by step under :func:`pydso.minimize`.
        """
        z, code, n_steps = self._run(solver, rtol, atol, max_steps, optimizer, steps, z0)
        return self.result(z, n_steps=n_steps, code=code)


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
    ):
        if not isinstance(model, StateSpaceModel):
            raise SysIdError(f"model must be a ContinuousModel or DiscreteModel, got {type(model).__name__}")
        self.loss = as_loss(loss)
        u, y, ts, dt, xs = extract_arrays(data, model)
        E, T, ny = y.shape
        nu = u.shape[-1]
        self.n_episodes, self.n_samples, self.n_outputs, self.n_inputs = E, T, ny, nu
        space = ParamSpace(model.params if params is None else params, transforms or model.transforms)
        theta0 = space.unflatten(space.z0)
        nx = model.n_states
        x0a = model.x0 if x0 is None else np.asarray(x0, float)
        if x0a.shape[-1:] != (nx,) or x0a.ndim > 2 or (x0a.ndim == 2 and x0a.shape[0] not in (1, E)):
            raise SysIdError(f"x0 has shape {x0a.shape}; expected ({nx},) or ({E}, {nx}) (episodes, states)")
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
            z_parts.append(jnp.asarray(x0g).ravel())
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
        self.theta0 = jnp.concatenate(z_parts)

    # ---- sizes
    @property
    def n_theta(self) -> int:
        return self.sim.n_theta

    @property
    def n_x0(self) -> int:
        return self.sim.n_x0

    # ---- the residuals of the loss
    def residuals(self, theta):
        """Residual vector of the loss at the unconstrained vector ``theta`` (1-D, traceable)."""
        lo, model, sim = self.loss, self.sim.model, self.sim
        z = theta
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
    def result(self, theta, *, n_steps: int = 0, code: int | None = None) -> SysIdResult:
        """The identification report at the unconstrained vector ``theta`` (e.g. ``pydso.minimize(...).theta``):
        physical estimates, covariance, 95% intervals and fit metrics. ``code`` (0 successful, 1 max steps,
        2 failed; None: unknown) and ``n_steps`` record how ``theta`` was obtained."""
        s = self._summary(theta, n_steps, code)
        z, est, se, q = s["z"], s["estimate"], s["stderr"], s["q"]
        y = np.asarray(self.sim.y)
        rmse, nrmse, fitp = fit_metrics(s["ys"], y)
        theta_p, x0 = self.sim.theta_x0(z[: self.n_core])
        return SysIdResult(
            names=list(self.space.names),
            estimate=est,
            stderr=se,
            ci_low=est - q * se,
            ci_high=est + q * se,
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
        )


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


def sysid(model, data, *, loss="simulation", params=None, x0=None, output_scale=None, transforms=None):
    """The problem constructor of system identification: a :class:`SysIdProblem` (see :mod:`pydso.problems`
    for the contract: ``.theta0``, ``.residuals``, ``.result``; solve with ``.fit()`` or :func:`pydso.minimize`)."""
    return SysIdProblem(model, data, loss=loss, params=params, x0=x0, output_scale=output_scale, transforms=transforms)


def fit(
    model,
    data,
    *,
    loss="simulation",
    params=None,
    x0=None,
    output_scale=None,
    transforms=None,
    solver="lm",
    **solver_options,
) -> SysIdResult:
    """Identify ``model`` from ``data`` (a pydso dataset): build the problem and solve it.

    ``loss``: ``'simulation'`` (default), ``'multiple-shooting'``, ``'prediction'``, ``'nll'`` or a loss object
    (:class:`Simulation`, :class:`MultipleShooting`, :class:`Prediction`, :class:`GaussianNLL`). ``params`` /
    ``x0`` / ``transforms`` override the model's initial guesses. ``solver``: ``'lm'`` (default), ``'bfgs'``,
    ``'optax'`` or a :class:`pydso.LevenbergMarquardt` / :class:`pydso.GaussNewton` object; further keywords go
    to :meth:`SysIdProblem.fit`.
    """
    prob = sysid(model, data, loss=loss, params=params, x0=x0, output_scale=output_scale, transforms=transforms)
    return prob.fit(solver=solver, **solver_options)
