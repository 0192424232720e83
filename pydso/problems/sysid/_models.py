r"""The models and their simulation: :class:`ContinuousModel`, :class:`DiscreteModel`, the traceable simulators
:func:`simulate_states` / :func:`simulate_outputs`, the NumPy convenience :func:`simulate` and
:func:`finite_difference_states`.

Continuous models are integrated by the JAX backend's fixed-step ensemble integrator
(:func:`pydso.backends.jax.fixed_step_ensemble` with :class:`pydso.RK4`, the recorded input fed by zero-order hold
or linear interpolation, ``substeps`` RK4 steps per sample interval, all episodes as one struct-of-arrays state),
or adaptively by diffrax (``integrator="diffrax"``, the reference); discrete models by one :func:`jax.lax.scan`.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..._checks import check_positive_int
from ..._typing import PyTree
from ...backends.jax import RK4, fixed_step_ensemble
from ._errors import SysIdError

__all__ = [
    "StateSpaceModel",
    "ContinuousModel",
    "DiscreteModel",
    "finite_difference_states",
    "simulate_states",
    "simulate_outputs",
    "simulate",
]


class StateSpaceModel:
    """Common part of :class:`ContinuousModel` and :class:`DiscreteModel` (not instantiated directly).

    Models are plain Python objects compared by identity: compiled fits and simulations are cached per model
    object (pass the same object to fit many datasets with one compilation).
    """

    kind = "model"

    def __init__(self, f, h, params, *, x0, transforms, estimate_x0, state_from_output, autonomous, name):
        if not callable(f):
            raise SysIdError("model f must be callable")
        if h is not None and not callable(h):
            raise SysIdError("model output map h must be callable or None (output = state)")
        self.f = f
        self.h = h if h is not None else _identity_output
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
        """:math:`y = h(x, u, \\theta)` as a 1-D array."""
        return jnp.atleast_1d(self.h(x, u, theta))

    def derivative_shape(self, theta, nx: int, nu: int):
        """Shape of ``f``'s value for a state of size ``nx`` and an input of size ``nu`` (abstract evaluation)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, n_states={self.n_states})"


def _identity_output(x, u, theta):
    return x


class ContinuousModel(StateSpaceModel):
    r"""Continuous-time state-space model :math:`\dot x = f(t, x, u, \theta)`, :math:`y = h(x, u, \theta)`.

    **Arguments:**

    - ``f(t, x, u, theta)``, ``h(x, u, theta)`` (``None``: the output is the state).
    - ``params``: physical initial guesses, a dict or any pytree with float array leaves (e.g. an equinox network).
    - ``x0``: initial-state guess; its length fixes the state dimension.
    - ``transforms``: ``{name: None | 'positive' | 'softplus' | (lower, upper)}``.
    - ``estimate_x0``: the initial states are parameters (default True).
    - ``input``: ``'zoh'`` (zero-order hold: constant over each sample interval, the usual assumption for data
      from a DAC/ADC pair) or ``'linear'`` (linear interpolation: for band-limited analogue inputs).
    - ``substeps``: RK4 steps per sample interval (fixed-step integration by the JAX backend).
    - ``integrator``: ``'rk4'`` (fixed steps, :func:`pydso.backends.jax.fixed_step_ensemble`; default, fast,
      exact for ZOH since the input is constant over every step) or ``'diffrax'`` (adaptive Tsit5 + PID with
      ``rtol``/``atol``, input by :class:`diffrax.LinearInterpolation`: the reference; ``input='linear'`` only).
    - ``state_from_output(y, u, dt) -> (T, n_states)``: states from data, used by prediction losses and to
      initialise multiple-shooting segments.
    - ``autonomous``: a system without input (the data need no ``input`` variable).
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
        check_positive_int(substeps, "substeps", error=SysIdError)
        self.input, self.substeps, self.integrator = input, substeps, integrator
        self.rtol, self.atol = rtol, atol

    def derivative_shape(self, theta, nx: int, nu: int):
        return jax.eval_shape(lambda x, u: self.f(0.0, x, u, theta), jnp.zeros(nx), jnp.zeros(nu)).shape

    def states(self, theta, x0, u, *, dt, t0):
        """States ``(N, n + 1, nx)`` from ``x0 (N, nx)`` driven by ``u (N, n + 1, nu)`` (sample ``k`` at
        ``t0 + k dt``; the last input sample only feeds linear interpolation)."""
        n = u.shape[1] - 1
        if self.integrator == "diffrax":
            ts = t0 + dt * jnp.arange(n + 1, dtype=x0.dtype)
            return jax.vmap(lambda x, uu: self._diffrax_states(x, ts, uu, theta))(x0, u)
        xs, _ = fixed_step_ensemble(
            self.f,
            x0,
            theta,
            dt=dt / self.substeps,
            n_steps=n * self.substeps,
            save_every=self.substeps,
            solver=RK4(),
            t0=t0,
            inputs=u,
            input_interpolation=self.input,
        )
        return xs

    def _diffrax_states(self, x0, ts, u, theta):
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
            stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
            max_steps=64 * ts.shape[0] + 4096,
            # forward-mode (Jacobians) and reverse-mode (optax/BFGS) both work through DirectAdjoint;
            # the default RecursiveCheckpointAdjoint is reverse-mode only
            adjoint=diffrax.DirectAdjoint(),
        )
        return sol.ys


class DiscreteModel(StateSpaceModel):
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

    def derivative_shape(self, theta, nx: int, nu: int):
        return jax.eval_shape(lambda x, u: self.f(x, u, theta), jnp.zeros(nx), jnp.zeros(nu)).shape

    def states(self, theta, x0, u, *, dt, t0):
        del dt, t0

        def one(x, uu):
            def body(x, u_k):
                x1 = self.f(x, u_k, theta)
                return x1, x1

            _, xs = jax.lax.scan(body, x, uu[:-1])
            return jnp.concatenate([x[None], xs], axis=0)

        return jax.vmap(one)(x0, u)


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


def simulate_states(model: StateSpaceModel, theta: PyTree, x0, u, *, dt, t0=0.0) -> jax.Array:
    r"""States of ``N`` free-run simulations (traceable and differentiable in ``theta``, ``x0``, ``u``).

    **Arguments:** ``model``; ``theta`` (physical parameter pytree); ``x0`` ``(N, n_states)``; ``u``
    ``(N, n + 1, input_dim)`` the input samples at ``t0 + k dt`` (the last one only feeds linear interpolation);
    ``dt`` the sample time; ``t0`` the start time (may be traced).

    **Returns:** the states at the ``n + 1`` sample times, ``(N, n + 1, n_states)``.
    """
    return model.states(theta, x0, u, dt=dt, t0=t0)


def simulate_outputs(model: StateSpaceModel, theta: PyTree, x0, u, *, dt, t0=0.0) -> tuple[jax.Array, jax.Array]:
    r"""Outputs and states of ``N`` free-run simulations: :math:`y_k = h(x_k, u_k, \theta)` at the samples of ``u``.

    Same arguments as :func:`simulate_states`; returns ``(ys (N, n + 1, output_dim), xs (N, n + 1, n_states))``.
    """
    xs = model.states(theta, x0, u, dt=dt, t0=t0)
    ys = jax.vmap(jax.vmap(lambda x, uu: model.output(x, uu, theta)))(xs, u)
    return ys, xs


@eqx.filter_jit
def _simulate_compiled(model, theta, x0, u, dt, t0):
    return simulate_outputs(model, theta, x0, u, dt=dt, t0=t0)[0]


def simulate(model: StateSpaceModel, params: PyTree, u, *, dt: float, x0, t0: float = 0.0) -> np.ndarray:
    """Free-run simulation of ``model`` with parameters ``params`` (NumPy in and out; compiled once per model
    object and shapes by :func:`equinox.filter_jit`). For use inside JAX code see :func:`simulate_outputs`.

    **Arguments:**

    - ``model``: a :class:`ContinuousModel` or :class:`DiscreteModel`.
    - ``params``: the physical parameter pytree (e.g. ``result.params``).
    - ``u``: the input, ``(T, input_dim)`` (or ``(T,)``), or a batch ``(N, T, input_dim)``.
    - ``dt``: the sample time; ``t0``: the time of the first sample.
    - ``x0``: the initial state ``(n_states,)``, or ``(N, n_states)`` for a batch (one state is shared).

    **Returns:** the outputs at the samples of ``u``: ``(T, output_dim)`` or ``(N, T, output_dim)``.
    """
    u = np.asarray(u, float)
    if u.ndim == 1:
        u = u[:, None]
    single = u.ndim == 2
    ub = u[None] if single else u
    if ub.ndim != 3:
        raise SysIdError(f"u must have shape (T, input_dim) or (N, T, input_dim), got {u.shape}")
    x0 = np.asarray(x0, float)
    x0b = np.broadcast_to(x0, (ub.shape[0], model.n_states)) if x0.ndim == 1 else x0
    if x0b.shape != (ub.shape[0], model.n_states):
        raise SysIdError(f"x0 has shape {x0.shape}; expected ({model.n_states},) or ({ub.shape[0]}, {model.n_states})")
    th = jax.tree.map(lambda v: jnp.asarray(v) if isinstance(v, int | float | np.ndarray | np.number) else v, params)
    ys = np.asarray(
        _simulate_compiled(model, th, jnp.asarray(x0b), jnp.asarray(ub), jnp.asarray(dt, float), jnp.asarray(t0, float))
    )
    return ys[0] if single else ys
