"""The models and their simulation: :class:`ContinuousModel` (RK4 scan or diffrax), :class:`DiscreteModel`,
the free-run simulators (:func:`simulate`, the traced ``_simulate`` and ``_segment_sim``) and
:func:`finite_difference_states`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import SysIdError

PyTree = Any


class _Model:
    kind = "model"

    def __init__(self, f, h, params, *, x0, transforms, estimate_x0, state_from_output, autonomous, name):
        if not callable(f):
            raise SysIdError("model f must be callable")
        if h is not None and not callable(h):
            raise SysIdError("model output map h must be callable or None (output = state)")
        self.f = f
        self.h = h if h is not None else (lambda x, u, theta: x)
        self.params = params
        self.x0 = np.atleast_1d(np.asarray(x0, dtype=float))
        if self.x0.ndim != 1:
            raise SysIdError(f"x0 must be a vector of initial states, got shape {self.x0.shape}")
        self.n_states = int(self.x0.shape[0])
        self.transforms = dict(transforms or {})
        self.estimate_x0 = bool(estimate_x0)
        self.state_from_output = state_from_output
        self.autonomous = bool(autonomous)
        self.name = name or type(self).__name__

    def output(self, x, u, theta):
        return jnp.atleast_1d(self.h(x, u, theta))

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, n_states={self.n_states})"


class ContinuousModel(_Model):
    r"""Continuous-time state-space model :math:`\dot x = f(t, x, u, \theta)`, :math:`y = h(x, u, \theta)`.

    Arguments: ``f(t, x, u, theta)``, ``h(x, u, theta)`` (``None``: the output is the state), ``params`` (physical
    initial guesses: dict or any pytree with float array leaves, e.g. an equinox network), ``x0`` (initial-state
    guess; its length fixes the state dimension), ``transforms`` (``{name: None | 'positive' | 'softplus' |
    (lower, upper)}``), ``estimate_x0`` (initial states are parameters, default True), ``input`` (``'zoh'`` or
    ``'linear'``), ``substeps`` (RK4 steps per sample interval), ``integrator`` (``'rk4'`` fixed-step scan or
    ``'diffrax'`` adaptive Tsit5 with linear input), ``state_from_output(y, u, dt) -> (T, n_states)`` (states
    from data: used by prediction losses and to initialise multiple-shooting segments).
    """

    kind = "continuous"

    def __init__(
        self,
        f: Callable,
        h: Callable | None,
        params: PyTree,
        *,
        x0,
        transforms: dict | None = None,
        estimate_x0: bool = True,
        input: str = "zoh",
        substeps: int = 1,
        integrator: str = "rk4",
        state_from_output: Callable | None = None,
        autonomous: bool = False,
        rtol: float = 1e-8,
        atol: float = 1e-10,
        name: str = "",
    ):
        super().__init__(
            f,
            h,
            params,
            x0=x0,
            transforms=transforms,
            estimate_x0=estimate_x0,
            state_from_output=state_from_output,
            autonomous=autonomous,
            name=name,
        )
        if input not in ("zoh", "linear"):
            raise SysIdError(f"input must be 'zoh' or 'linear', got {input!r}")
        if integrator not in ("rk4", "diffrax"):
            raise SysIdError(f"integrator must be 'rk4' or 'diffrax', got {integrator!r}")
        if integrator == "diffrax" and input != "linear":
            raise SysIdError("integrator='diffrax' feeds the input by diffrax.LinearInterpolation: use input='linear'")
        if not isinstance(substeps, int) or substeps < 1:
            raise SysIdError(f"substeps must be a positive integer, got {substeps!r}")
        self.input, self.substeps, self.integrator = input, substeps, integrator
        self.rtol, self.atol = rtol, atol

    def step(self, t, x, u0, u1, theta, dt):
        """State after one sample interval ``[t, t+dt]`` (RK4, ``substeps`` steps, ZOH or linear input)."""
        n = self.substeps
        h = dt / n
        f = self.f
        for j in range(n):
            s0 = j / n
            if self.input == "zoh":
                ua = ub = uc = u0
            else:
                ua = u0 + (u1 - u0) * s0
                ub = u0 + (u1 - u0) * (s0 + 0.5 / n)
                uc = u0 + (u1 - u0) * (s0 + 1.0 / n)
            tj = t + s0 * dt
            k1 = f(tj, x, ua, theta)
            k2 = f(tj + h / 2, x + h / 2 * k1, ub, theta)
            k3 = f(tj + h / 2, x + h / 2 * k2, ub, theta)
            k4 = f(tj + h, x + h * k3, uc, theta)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    def simulate_diffrax(self, x0, ts, u, theta):
        path = diffrax.LinearInterpolation(ts=ts, ys=u)
        term = diffrax.ODETerm(lambda t, x, th: self.f(t, x, path.evaluate(t), th))
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            (ts[1] - ts[0]) / self.substeps,
            x0,
            args=theta,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol, jump_ts=None),
            max_steps=64 * ts.shape[0] + 4096,
            # forward-mode (Jacobians) and reverse-mode (optax/BFGS) both work through DirectAdjoint;
            # the default RecursiveCheckpointAdjoint is reverse-mode only
            adjoint=diffrax.DirectAdjoint(),
        )
        return sol.ys


class DiscreteModel(_Model):
    r"""Discrete-time state-space model :math:`x_{k+1} = f(x_k, u_k, \theta)`, :math:`y_k = h(x_k, u_k, \theta)`.

    Same arguments as :class:`ContinuousModel` (no integrator options). ``dt`` (optional) is the sample time the
    model was built for; data with another sample time are refused.
    """

    kind = "discrete"

    def __init__(
        self,
        f: Callable,
        h: Callable | None,
        params: PyTree,
        *,
        x0,
        transforms: dict | None = None,
        estimate_x0: bool = True,
        dt: float | None = None,
        state_from_output: Callable | None = None,
        autonomous: bool = False,
        name: str = "",
    ):
        super().__init__(
            f,
            h,
            params,
            x0=x0,
            transforms=transforms,
            estimate_x0=estimate_x0,
            state_from_output=state_from_output,
            autonomous=autonomous,
            name=name,
        )
        self.dt = dt
        self.integrator = "scan"

    def step(self, t, x, u0, u1, theta, dt):
        return self.f(x, u0, theta)


def finite_difference_states(order: int = 2) -> Callable:
    """``state_from_output`` for a single-output model whose state is ``(y, y', ..., y^(order-1))``:
    derivatives by central finite differences (``numpy.gradient``)."""

    def fn(y, u, dt):
        y = np.asarray(y)[:, 0]
        cols = [y]
        for _ in range(order - 1):
            cols.append(np.gradient(cols[-1], dt))
        return np.stack(cols, axis=-1)

    return fn


def _simulate(model, x0, ts, u, theta, dt):
    """Free-run simulation of one episode: outputs (T, ny) and the final state."""
    if getattr(model, "integrator", "rk4") == "diffrax":
        xs = model.simulate_diffrax(x0, ts, u, theta)
        ys = jax.vmap(lambda x, uu: model.output(x, uu, theta))(xs, u)
        return ys, xs[-1]
    u_next = jnp.concatenate([u[1:], u[-1:]], axis=0)

    def body(x, inp):
        t, u0, u1 = inp
        y = model.output(x, u0, theta)
        return model.step(t, x, u0, u1, theta, dt), y

    x_end, ys = jax.lax.scan(body, x0, (ts, u, u_next))
    return ys, x_end


_SIM_CACHE: dict = {}


def simulate(model, params, u, *, dt: float, x0, t0: float = 0.0) -> np.ndarray:
    """Free-run simulation of ``model`` with parameters ``params`` (physical pytree, e.g. ``result.params``)
    driven by the input ``u`` of shape ``(T, input_dim)`` from the state ``x0``: returns ``(T, output_dim)``.
    Compiled once per model and input length (a fixed-step scan, as in the fit)."""
    u = np.asarray(u, float)
    if u.ndim == 1:
        u = u[:, None]
    key = (id(model), u.shape)
    fn = _SIM_CACHE.get(key)
    if fn is None:
        fn = jax.jit(lambda th, uu, x, ts, dt_: _simulate(model, x, ts, uu, th, dt_)[0])
        _SIM_CACHE[key] = fn
        _SIM_CACHE[("model", id(model))] = model  # keep alive: ids stay unique
    ts = t0 + dt * np.arange(u.shape[0])
    th = jax.tree.map(lambda v: jnp.asarray(v) if isinstance(v, int | float | np.ndarray | np.number) else v, params)
    return np.asarray(fn(th, jnp.asarray(u), jnp.asarray(x0, float), jnp.asarray(ts), jnp.asarray(dt, float)))


def _segment_sim(model, x0, ts, u_ext, theta, dt):
    """Simulate ``L`` steps: ``u_ext`` has ``L+1`` samples (the last only feeds linear interpolation)."""

    def body(x, inp):
        t, u0, u1 = inp
        y = model.output(x, u0, theta)
        return model.step(t, x, u0, u1, theta, dt), y

    x_end, ys = jax.lax.scan(body, x0, (ts, u_ext[:-1], u_ext[1:]))
    return ys, x_end
