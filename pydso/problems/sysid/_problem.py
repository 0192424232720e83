"""The single-experiment problem: :class:`SysIdProblem` (residuals of every loss, the compiled and cached solve,
the covariance), its outcome :class:`SysIdResult`, the fit metrics and the constructors :func:`sysid` and
:func:`fit`.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ._data import _extract
from ._errors import SysIdError
from ._losses import GaussianNLL, MultipleShooting, Prediction, Simulation, _as_loss
from ._models import PyTree, _Model, _segment_sim, _simulate, simulate
from ._transforms import _ParamSpace

_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()


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


class SysIdProblem:
    """A system-identification problem: a model, data, a loss and the parameter space.

    Use :meth:`residuals` (a function of the unconstrained vector) for custom solvers, :meth:`fit` to solve.
    Compiled solves are cached per (model, loss, solver, data shapes): fitting many experiments of the same
    shape compiles once.
    """

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
        if not isinstance(model, _Model):
            raise SysIdError(f"model must be a ContinuousModel or DiscreteModel, got {type(model).__name__}")
        self.model = model
        self.loss = _as_loss(loss)
        u, y, ts, dt, xs = _extract(data, model)
        self.E, self.T, self.ny = y.shape
        self.nu = u.shape[-1]
        self.dt = dt
        self.space = _ParamSpace(model.params if params is None else params, transforms or model.transforms)
        theta0 = self.space.unflatten(self.space.z0)
        nx = model.n_states
        x0a = model.x0 if x0 is None else np.asarray(x0, float)
        if x0a.shape[-1:] != (nx,) or x0a.ndim > 2 or (x0a.ndim == 2 and x0a.shape[0] not in (1, self.E)):
            raise SysIdError(f"x0 has shape {x0a.shape}; expected ({nx},) or ({self.E}, {nx}) (episodes, states)")
        x0g = np.broadcast_to(x0a, (self.E, nx)).copy()
        # model output dimension check (by abstract evaluation: no compile)
        try:
            out = jax.eval_shape(lambda x, uu: model.output(x, uu, theta0), jnp.zeros(nx), jnp.zeros(self.nu))
            fx = jax.eval_shape(lambda x, uu: model.step(0.0, x, uu, uu, theta0, dt), jnp.zeros(nx), jnp.zeros(self.nu))
        except SysIdError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SysIdError(
                f"calling model {model.name!r} with a state of size {nx} and an input of size {self.nu} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        if out.shape != (self.ny,):
            raise SysIdError(
                f"model output dimension mismatch: h returns shape {out.shape}, the dataset 'output' has "
                f"{self.ny} channel(s)"
            )
        if fx.shape != (nx,):
            raise SysIdError(f"model f returns shape {fx.shape}, expected the state shape {(nx,)}")
        if output_scale is None:
            scale = np.std(y.reshape(-1, self.ny), axis=0)
            scale = np.where(scale > 0, scale, 1.0)
        else:
            scale = np.broadcast_to(np.asarray(output_scale, float), (self.ny,))
            if np.any(~(scale > 0)):
                raise SysIdError(f"output_scale must be positive, got {output_scale!r}")
        self.arrays = {
            "u": jnp.asarray(u),
            "y": jnp.asarray(y),
            "ts": jnp.asarray(ts),
            "dt": jnp.asarray(dt),
            "scale": jnp.asarray(scale),
        }
        self.y_np = y
        # state initialisation from data (prediction losses, multiple-shooting segments)
        xdata = None
        if xs is not None:
            xdata = xs
        elif model.state_from_output is not None:
            xdata = np.stack([np.asarray(model.state_from_output(y[e], u[e], dt), float) for e in range(self.E)])
            if xdata.shape != (self.E, self.T, nx):
                raise SysIdError(
                    f"state_from_output returned shape {xdata.shape[1:]} per episode, expected {(self.T, nx)}"
                )
        self.xdata = xdata
        n_th = self.space.size
        self.n_theta = n_th
        self.n_x0 = self.E * nx if model.estimate_x0 else 0
        if not model.estimate_x0:
            self.arrays["x0"] = jnp.asarray(x0g)
        z_parts = [self.space.z0]
        if model.estimate_x0:
            z_parts.append(jnp.asarray(x0g).ravel())
        lo = self.loss
        if isinstance(lo, MultipleShooting):
            L = lo.segment_length
            S = max(1, math.ceil((self.T - 1) / L))
            self.S, self.L = S, L
            pad = S * L + 1 - self.T
            mask = np.ones((self.E, S * L + 1))
            mask[:, self.T :] = 0.0
            up = np.concatenate([u, np.repeat(u[:, -1:], pad, axis=1)], axis=1)
            yp = np.concatenate([y, np.zeros((self.E, pad, self.ny))], axis=1)
            tp = ts[0] + dt * np.arange(S * L + 1)
            self.arrays.update(u_ms=jnp.asarray(up), y_ms=jnp.asarray(yp), m_ms=jnp.asarray(mask), t_ms=jnp.asarray(tp))
            init = lo.init
            if init == "auto":
                init = "data" if xdata is not None else "simulate"
            if init == "data":
                if xdata is None:
                    raise SysIdError(
                        "MultipleShooting(init='data') needs a measured 'state' of the model's size or "
                        "model.state_from_output"
                    )
                starts = xdata[:, L : (S - 1) * L + 1 : L] if S > 1 else np.zeros((self.E, 0, nx))
            else:
                states = jax.vmap(lambda x0_, uu: self._state_traj(x0_, uu, theta0, jnp.asarray(tp)))(
                    jnp.asarray(x0g), jnp.asarray(up)
                )
                starts = np.asarray(states)[:, L : (S - 1) * L + 1 : L]
            starts = np.asarray(starts).reshape(self.E, S - 1, nx)
            sc = np.std(starts.reshape(-1, nx), axis=0) if S > 2 else np.ones(nx)
            sc = np.where(np.isfinite(sc) & (sc > 0), sc, 1.0)
            self.arrays["xscale"] = jnp.asarray(sc)
            self.arrays["wc"] = jnp.asarray(math.sqrt(lo.weight))
            z_parts.append(jnp.asarray(starts).ravel())
            self.n_seg = self.E * (S - 1) * nx
        elif isinstance(lo, Prediction):
            if xdata is None:
                raise SysIdError(
                    "the prediction loss needs states from the data: a 'state' variable with the model's "
                    f"{nx} state(s), or model.state_from_output(y, u, dt)"
                )
            if lo.k >= self.T:
                raise SysIdError(f"Prediction.k = {lo.k} must be smaller than the record length {self.T}")
            self.arrays["xd"] = jnp.asarray(xdata)
        elif isinstance(lo, GaussianNLL):
            z_parts.append(jnp.zeros(self.ny))  # log noise std in scaled units
        self.z0 = jnp.concatenate(z_parts)

    # ---- pieces of the unconstrained vector
    def _theta_x0(self, z, arrays):
        nx = self.model.n_states
        theta = self.space.unflatten(z[: self.n_theta])
        if self.model.estimate_x0:
            x0 = z[self.n_theta : self.n_theta + self.n_x0].reshape(self.E, nx)
        else:
            x0 = arrays["x0"]
        return theta, x0

    def _state_traj(self, x0, u, theta, ts):
        model, dt = self.model, self.dt
        u_next = jnp.concatenate([u[1:], u[-1:]], axis=0)

        def body(x, inp):
            t, u0, u1 = inp
            return model.step(t, x, u0, u1, theta, dt), x

        _, xs = jax.lax.scan(body, x0, (ts, u, u_next))
        return xs

    def simulate_outputs(self, z, arrays):
        """Free-run simulated outputs (episode, time, output) at the (core) unconstrained vector ``z``."""
        theta, x0 = self._theta_x0(z, arrays)
        return jax.vmap(lambda x, u: _simulate(self.model, x, arrays["ts"], u, theta, arrays["dt"])[0])(x0, arrays["u"])

    def simulation_residuals(self, z, arrays):
        ys = self.simulate_outputs(z, arrays)
        return ((ys - arrays["y"]) / arrays["scale"]).ravel()

    def _physical_flat(self, zt):
        """Physical values of the scalar parameters from the parameter block ``z[:n_theta]``."""
        return self.space.physical_flat(zt)

    def residuals(self, z, arrays=None):
        """Residual vector of the chosen loss as a function of the unconstrained parameter vector ``z``."""
        arrays = self.arrays if arrays is None else arrays
        lo, model, nx = self.loss, self.model, self.model.n_states
        if isinstance(lo, Simulation | GaussianNLL):
            return self.simulation_residuals(z, arrays)
        theta, x0 = self._theta_x0(z, arrays)
        dt = arrays["dt"]
        if isinstance(lo, MultipleShooting):
            S, L, E = self.S, self.L, self.E
            off = self.n_theta + self.n_x0
            mids = z[off : off + self.n_seg].reshape(E, S - 1, nx)
            starts = jnp.concatenate([x0[:, None, :], mids], axis=1)  # (E,S,nx)
            idx = np.arange(S)[:, None] * L + np.arange(L + 1)[None, :]  # (S, L+1)
            u_seg = arrays["u_ms"][:, idx]  # (E,S,L+1,nu)
            t_seg = arrays["t_ms"][idx[:, :-1]]  # (S,L)
            seg = jax.vmap(jax.vmap(lambda x, t, u: _segment_sim(model, x, t, u, theta, dt), (0, 0, 0)), (0, None, 0))
            ys, xe = seg(starts, t_seg, u_seg)  # (E,S,L,ny), (E,S,nx)
            y_seg = arrays["y_ms"][:, idx[:, :-1]]
            m_seg = arrays["m_ms"][:, idx[:, :-1]][..., None]
            r_out = ((ys - y_seg) / arrays["scale"] * m_seg).ravel()
            r_cont = (arrays["wc"] * (xe[:, :-1] - mids) / arrays["xscale"]).ravel()
            return jnp.concatenate([r_out, r_cont])
        if isinstance(lo, Prediction):
            k, T = lo.k, self.T
            starts = np.arange(T - k)
            idx = starts[:, None] + np.arange(k + 1)[None, :]  # (N, k+1)

            def one(xstart, tt, uu):
                _, ys = jax.lax.scan(
                    lambda x, inp: (model.step(inp[0], x, inp[1], inp[2], theta, dt),) * 2,
                    xstart,
                    (tt, uu[:-1], uu[1:]),
                )
                return jax.vmap(lambda x, u_: model.output(x, u_, theta))(ys, uu[1:])

            xs = arrays["xd"][:, starts]
            pred = jax.vmap(jax.vmap(one, (0, 0, 0)), (0, None, 0))(
                xs, arrays["ts"][idx[:, :-1]], arrays["u"][:, idx]
            )  # (E,N,k,ny)
            yt = arrays["y"][:, idx[:, 1:]]
            return ((pred - yt) / arrays["scale"]).ravel()
        raise SysIdError(f"unsupported loss {lo!r}")

    # ---- compiled solve
    def _key(self, solver, extra):
        shapes = tuple((k, tuple(v.shape)) for k, v in sorted(self.arrays.items()))
        return (
            id(self.model),
            self.loss,
            solver,
            extra,
            shapes,
            self.z0.shape,
            tuple(self.space.names),
            repr(self.space.specs),
            self.model.estimate_x0,
        )

    def _compiled(self, solver, rtol, atol, max_steps, optimizer, steps):
        key = self._key(solver, (rtol, atol, max_steps, id(optimizer), steps))
        with _COMPILED_LOCK:
            hit = _COMPILED.get(key)
        if hit is not None:
            return hit[0]
        is_nll = isinstance(self.loss, GaussianNLL)
        ny = self.ny
        n_core = int(self.z0.shape[0]) - (self.ny if is_nll else 0)

        def nll(z, arrays):
            r = self.residuals(z[:n_core], arrays).reshape(-1, ny)
            ls = z[n_core:]
            return jnp.sum(0.5 * (r * jnp.exp(-ls)) ** 2 + ls)

        if solver == "lm" and not is_nll:
            sol_obj = optx.LevenbergMarquardt(rtol=rtol, atol=atol)

            def run(z0, arrays):
                # Jacobi (column) scaling fixed at the start point: LM's damping is not scale invariant, and
                # physical parameters differ by orders of magnitude.
                J0 = jax.jacfwd(self.residuals)(z0, arrays)
                cn = jnp.linalg.norm(J0, axis=0)
                sc = jnp.where(jnp.isfinite(cn) & (cn > 0), 1.0 / cn, 1.0)
                sol = optx.least_squares(
                    lambda w, a: self.residuals(w * sc, a),
                    sol_obj,
                    z0 / sc,
                    args=arrays,
                    max_steps=max_steps,
                    throw=False,
                )
                return sol.value * sc, sol.result._value, sol.stats["num_steps"]

        elif solver in ("lm", "bfgs"):
            sol_obj = optx.BFGS(rtol=rtol, atol=atol)
            fn = nll if is_nll else (lambda z, a: 0.5 * jnp.sum(self.residuals(z, a) ** 2))

            def run(z0, arrays):
                sol = optx.minimise(fn, sol_obj, z0, args=arrays, max_steps=max_steps, throw=False)
                return sol.value, sol.result._value, sol.stats["num_steps"]

        elif solver == "optax":
            import optax

            opt = optimizer if optimizer is not None else optax.adam(1e-2)
            fn = nll if is_nll else (lambda z, a: 0.5 * jnp.sum(self.residuals(z, a) ** 2))

            def run(z0, arrays):
                def body(carry, _):
                    z, st = carry
                    g = jax.grad(fn)(z, arrays)
                    upd, st = opt.update(g, st, z)
                    return (z + upd, st), None

                (z, _), _ = jax.lax.scan(body, (z0, opt.init(z0)), None, length=steps)
                return z, jnp.asarray(0), jnp.asarray(steps)

        else:
            raise SysIdError(f"unknown solver {solver!r}: use 'lm', 'bfgs' or 'optax'")

        hess = jax.jit(jax.hessian(nll)) if is_nll else None
        fns = (jax.jit(run), self._post(), hess)
        with _COMPILED_LOCK:
            _COMPILED[key] = (fns, self.model)  # keep the model alive so its id is not reused
        return fns

    _SIM_KEYS = ("u", "y", "ts", "dt", "scale", "x0")

    def _sim_arrays(self, arrays):
        return {k: arrays[k] for k in self._SIM_KEYS if k in arrays}

    def _post_key(self):
        sim = self._sim_arrays(self.arrays)
        return (
            id(self.model),
            tuple((k, v.shape) for k, v in sorted(sim.items())),
            self.n_theta,
            self.n_x0,
            tuple(self.space.names),
            repr(self.space.specs),
            self.model.estimate_x0,
        )

    def _post(self):
        """Simulation residuals, their Jacobian, simulated outputs and the transform Jacobian at a point (one
        compiled call, shared by all losses of the same model and data shape)."""
        key = ("post", *self._post_key())
        with _COMPILED_LOCK:
            hit = _COMPILED.get(key)
        if hit is not None:
            return hit[0]
        n_th = self.n_theta

        def post(zc, arrays):
            r = self.simulation_residuals(zc, arrays)
            J = jax.jacfwd(self.simulation_residuals)(zc, arrays)
            ys = self.simulate_outputs(zc, arrays)
            zt = zc[:n_th]
            G = jax.jvp(self._physical_flat, (zt,), (jnp.ones_like(zt),))[1]  # transforms act elementwise
            return r, J, ys, G, self._physical_flat(zt)

        fn = jax.jit(post)
        with _COMPILED_LOCK:
            _COMPILED[key] = (fn, self.model)
        return fn

    def _solve(self, solver, rtol, atol, max_steps, optimizer, steps, z0) -> dict:
        """Run the compiled solve, then the covariance of the parameter block ``z[:n_theta]`` in physical units
        (``sigma^2 (J^T J)^-1`` of the simulation residuals over ``z[:n_theta + n_x0]``, or the inverse observed
        information for :class:`GaussianNLL`, mapped by the delta method) and the noise level."""
        run, post, hess = self._compiled(solver, rtol, atol, max_steps, optimizer, steps)
        z, code, nsteps = run(self.z0 if z0 is None else jnp.asarray(z0), self.arrays)
        n_core = self.n_theta + self.n_x0
        r, J, ys, G, est = post(z[:n_core], self._sim_arrays(self.arrays))
        H = hess(z, self.arrays) if hess is not None else None
        r, J, G, est = (np.asarray(a) for a in (r, J, G, est))
        code = int(code)
        finite = bool(np.all(np.isfinite(np.asarray(z)))) and bool(np.all(np.isfinite(r)))
        if not finite:
            from ..._errors import DivergenceError

            raise DivergenceError(
                f"sysid fit of model {self.model.name!r} diverged (non-finite parameters or simulation); "
                "try multiple shooting, a better initial guess or parameter transforms"
            )
        n_th = self.n_theta
        N = r.size
        dof = max(N - n_core, 1)
        ssr = float(r @ r)
        sigma2 = ssr / dof
        if isinstance(self.loss, GaussianNLL):
            Hn = np.asarray(H)
            try:
                cov_full = np.linalg.pinv(Hn, hermitian=True)
            except np.linalg.LinAlgError:
                cov_full = np.full_like(Hn, np.nan)
            cov_z = cov_full[:n_th, :n_th]
            cost = float(
                np.sum(0.5 * (r.reshape(-1, self.ny) * np.exp(-np.asarray(z[n_core:]))) ** 2 + np.asarray(z[n_core:]))
            )
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
        scale = np.asarray(self.arrays["scale"]).reshape(-1, self.ny)[0]
        if isinstance(self.loss, GaussianNLL):
            noise_std = np.exp(np.asarray(z[n_core:])) * scale
        else:
            noise_std = np.sqrt(np.sum(r.reshape(-1, self.ny) ** 2, axis=0) / max(N / self.ny - n_core / self.ny, 1))
            noise_std = noise_std * scale
        cov = G[:, None] * cov_z * G[None, :]
        se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        from scipy import stats

        q = float(stats.t.ppf(0.975, dof))
        messages = {0: "successful", 1: "max_steps reached", 2: "nonlinear solver failed"}
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
            "n_steps": int(nsteps),
            "converged": code == 0,
            "message": messages.get(code, f"solver result code {code}"),
        }

    def fit(
        self,
        *,
        solver: str = "lm",
        rtol: float = 1e-10,
        atol: float = 1e-10,
        max_steps: int = 500,
        optimizer=None,
        steps: int = 2000,
        z0=None,
    ) -> SysIdResult:
        """Solve and return a :class:`SysIdResult` (``solver``: ``'lm'`` Levenberg–Marquardt via optimistix,
        ``'bfgs'``, or ``'optax'`` with ``optimizer`` for ``steps`` steps)."""
        s = self._solve(solver, rtol, atol, max_steps, optimizer, steps, z0)
        z, est, se, q = s["z"], s["estimate"], s["stderr"], s["q"]
        rmse, nrmse, fitp = _metrics(s["ys"], self.y_np)
        theta, x0 = self._theta_x0(z[: self.n_theta + self.n_x0], self.arrays)
        return SysIdResult(
            names=list(self.space.names),
            estimate=est,
            stderr=se,
            ci_low=est - q * se,
            ci_high=est + q * se,
            cov=s["cov"],
            params=jax.tree.map(lambda v: np.asarray(v) if eqx.is_array(v) else v, theta),
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


def _metrics(ys, y):
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
    """Build a :class:`SysIdProblem` (the DSO problem constructor for system identification)."""
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
    solver: str = "lm",
    **solver_options,
) -> SysIdResult:
    """Identify ``model`` from ``data`` (a pydso dataset): build the problem and solve it.

    ``loss``: ``'simulation'`` (default), ``'multiple-shooting'``, ``'prediction'``, ``'nll'`` or a loss object
    (:class:`Simulation`, :class:`MultipleShooting`, :class:`Prediction`, :class:`GaussianNLL`). ``params`` /
    ``x0`` / ``transforms`` override the model's initial guesses. ``solver``: ``'lm'`` (default), ``'bfgs'``,
    ``'optax'``; further keywords go to :meth:`SysIdProblem.fit`.
    """
    prob = sysid(model, data, loss=loss, params=params, x0=x0, output_scale=output_scale, transforms=transforms)
    return prob.fit(solver=solver, **solver_options)
