r"""System identification as a DSO problem constructor.

The chain is the model driven by the *recorded* input; ``theta`` holds the model parameters and the initial
states; the cost compares the model output with the *recorded* output. Identification is then a (nonlinear)
least-squares problem solved by Levenberg–Marquardt (:func:`optimistix.least_squares`), or any optax optimiser.

Models (any JAX-traceable callables; ``theta`` is the parameter pytree — a dict of physical parameters, an
equinox network, or both: grey-box mixes are just callables that use both):

* :class:`ContinuousModel` — :math:`\dot x = f(t, x, u, \theta)`, :math:`y = h(x, u, \theta)`. The recorded input
  is fed by **zero-order hold** (default: constant over each sample interval, the usual assumption for data from
  a DAC / ADC pair) or by **linear interpolation**. Integration: fixed-step classical RK4 with ``substeps``
  steps per sample interval inside one :func:`jax.lax.scan` (default: fast, fixed shapes, exact for ZOH because
  the input is constant over every step); ``integrator="diffrax"`` instead integrates adaptively (Tsit5 + PID)
  through :class:`diffrax.LinearInterpolation` of the input (linear input only).
* :class:`DiscreteModel` — :math:`x_{k+1} = f(x_k, u_k, \theta)`, :math:`y_k = h(x_k, u_k, \theta)`.

Losses (residual vectors, all scaled by ``output_scale``, default: the standard deviation of each output):

* :class:`Simulation` — output (simulation) error of a free-run simulation from the estimated initial state;
* :class:`MultipleShooting` — the record cut into segments of ``segment_length`` samples, each with its own
  initial state as an extra parameter, plus continuity residuals ``sqrt(weight) (x_end,s - x_start,s+1)``;
* :class:`Prediction` — ``k``-step-ahead prediction error from states taken from the data (a measured ``state``
  variable of the right size, or ``model.state_from_output(y, u, dt)``); ``k=1`` is the one-step error;
* :class:`GaussianNLL` — simulation residuals with an estimated noise level per output, minimised as a
  Gaussian negative log-likelihood (BFGS); the covariance is then the inverse observed information.

After the fit the covariance of the physical parameters is :math:`\hat\sigma^2 (J^\top J)^{-1}` with ``J`` the
Jacobian of the *simulation* residuals at the optimum with respect to the unconstrained parameters and initial
states (nuisance), mapped to physical parameters by the delta method (``G cov G^T``, ``G`` the diagonal Jacobian
of the transforms); 95% intervals use Student's t with ``N - p`` degrees of freedom.

Joint fits (:func:`fit_joint`, :class:`JointSysIdProblem`): several experiments, some parameters ``shared`` by
all of them, the others (and the initial states) per experiment. The joint unconstrained vector holds the shared
block once and the per-experiment blocks with a leading experiment axis; the residual function of one experiment
is ``jax.vmap``-ed over the stacked experiments (which must therefore have equal shapes: no padding), giving one
least-squares problem for the same solvers and the same covariance computation over the joint vector.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from .._errors import ProblemError

__all__ = [
    "SysIdError",
    "ContinuousModel",
    "DiscreteModel",
    "Simulation",
    "MultipleShooting",
    "Prediction",
    "GaussianNLL",
    "SysIdProblem",
    "SysIdResult",
    "JointSysIdProblem",
    "JointSysIdResult",
    "sysid",
    "fit",
    "fit_joint",
    "finite_difference_states",
    "simulate",
]

PyTree = Any


class SysIdError(ProblemError):
    """A system-identification problem is inconsistent (data, model or options); the message names the problem."""


# --------------------------------------------------------------------------------------------- transforms
def _transform_pair(spec, name):
    """(to_physical, to_unconstrained) for one transform spec."""
    if spec is None or spec == "identity":
        return (lambda z: z), (lambda p: p)
    if spec in ("positive", "log", "exp"):

        def inv(p):
            if np.any(np.asarray(p) <= 0):
                raise SysIdError(f"parameter {name!r} has a positive transform but initial guess {p!r} <= 0")
            return jnp.log(p)

        return jnp.exp, inv
    if spec == "softplus":

        def inv(p):
            if np.any(np.asarray(p) <= 0):
                raise SysIdError(f"parameter {name!r} has a softplus transform but initial guess {p!r} <= 0")
            return p + jnp.log(-jnp.expm1(-p))

        return jax.nn.softplus, inv
    if isinstance(spec, tuple | list) and len(spec) in (2, 3):
        lo, hi = (spec[1], spec[2]) if len(spec) == 3 else spec
        if len(spec) == 3 and spec[0] not in ("bounded", "sigmoid"):
            raise SysIdError(f"unknown transform {spec!r} for parameter {name!r}")
        lo, hi = float(lo), float(hi)
        if not hi > lo:
            raise SysIdError(f"bounded transform of {name!r} needs lower < upper, got {lo}, {hi}")

        def inv(p):
            pa = np.asarray(p)
            if np.any(pa <= lo) or np.any(pa >= hi):
                raise SysIdError(f"initial guess of {name!r} = {p!r} lies outside its bounds ({lo}, {hi})")
            q = (p - lo) / (hi - lo)
            return jnp.log(q) - jnp.log1p(-q)

        return (lambda z: lo + (hi - lo) * jax.nn.sigmoid(z)), inv
    raise SysIdError(
        f"unknown transform {spec!r} for parameter {name!r}: use None, 'positive', 'softplus' or (lower, upper)"
    )


def _path_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts) or "theta"


class _ParamSpace:
    """Flattens the parameter pytree (array leaves only) into an unconstrained vector and back."""

    def __init__(self, params, transforms):
        params = jax.tree.map(
            lambda v: jnp.asarray(v, dtype=float) if isinstance(v, int | float | np.ndarray | np.number) else v,
            params,
        )
        dyn, self.static = eqx.partition(params, eqx.is_inexact_array)
        leaves_p, self.treedef = jax.tree_util.tree_flatten_with_path(dyn)
        transforms = dict(transforms or {})
        self.leaf_names = [_path_name(p) for p, _ in leaves_p]
        unknown = set(transforms) - set(self.leaf_names)
        if unknown:
            raise SysIdError(f"transforms given for unknown parameters {sorted(unknown)}; have {self.leaf_names}")
        self.shapes = [v.shape for _, v in leaves_p]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.fwd, z_leaves = [], []
        self.specs = [transforms.get(n) for n in self.leaf_names]
        for (_, v), n, spec in zip(leaves_p, self.leaf_names, self.specs, strict=True):
            to_phys, to_unc = _transform_pair(spec, n)
            self.fwd.append(to_phys)
            z_leaves.append(jnp.ravel(to_unc(v)))
        self.size = sum(self.sizes)
        self.z0 = jnp.concatenate(z_leaves) if z_leaves else jnp.zeros((0,))
        names = []
        for n, s, shape in zip(self.leaf_names, self.sizes, self.shapes, strict=True):
            names += [n] if shape == () else [f"{n}[{i}]" for i in range(s)]
        self.names = names

    def physical_flat(self, z):
        out, i = [], 0
        for f, s in zip(self.fwd, self.sizes, strict=True):
            out.append(f(z[i : i + s]))
            i += s
        return jnp.concatenate(out) if out else z

    def unflatten(self, z):
        flat = self.physical_flat(z)
        leaves, i = [], 0
        for s, shape in zip(self.sizes, self.shapes, strict=True):
            leaves.append(flat[i : i + s].reshape(shape))
            i += s
        dyn = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return eqx.combine(dyn, self.static)

    def jac_diag(self, z):
        """d physical / d z (the transforms act elementwise)."""
        return jax.jvp(self.physical_flat, (z,), (jnp.ones_like(z),))[1]


# --------------------------------------------------------------------------------------------- models
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


# --------------------------------------------------------------------------------------------- losses
@dataclasses.dataclass(frozen=True)
class Simulation:
    """Output (simulation) error of a free-run simulation."""

    name: str = "simulation"


@dataclasses.dataclass(frozen=True)
class MultipleShooting:
    """Segments of ``segment_length`` samples with their own initial states and weighted continuity residuals.

    ``init``: how segment states start — ``'auto'`` (``model.state_from_output`` if given, else a simulation
    with the initial guess), ``'data'`` or ``'simulate'``.
    """

    segment_length: int = 50
    weight: float = 1.0
    init: str = "auto"
    name: str = "multiple-shooting"

    def __post_init__(self):
        if not isinstance(self.segment_length, int) or self.segment_length < 2:
            raise SysIdError(f"MultipleShooting.segment_length must be an integer >= 2, got {self.segment_length!r}")
        if not self.weight > 0:
            raise SysIdError(f"MultipleShooting.weight must be > 0, got {self.weight!r}")
        if self.init not in ("auto", "data", "simulate"):
            raise SysIdError(f"MultipleShooting.init must be 'auto', 'data' or 'simulate', got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """``k``-step-ahead prediction error from states given by the data (``k=1``: one-step error)."""

    k: int = 1
    name: str = "prediction"

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise SysIdError(f"Prediction.k must be a positive integer, got {self.k!r}")


@dataclasses.dataclass(frozen=True)
class GaussianNLL:
    """Gaussian negative log-likelihood of the simulation residuals with one estimated noise std per output."""

    name: str = "nll"


_LOSSES = {
    "simulation": Simulation,
    "output": Simulation,
    "multiple-shooting": MultipleShooting,
    "multiple_shooting": MultipleShooting,
    "ms": MultipleShooting,
    "prediction": Prediction,
    "one-step": Prediction,
    "nll": GaussianNLL,
    "gaussian-nll": GaussianNLL,
}


def _as_loss(loss):
    if isinstance(loss, Simulation | MultipleShooting | Prediction | GaussianNLL):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]()
    raise SysIdError(f"unknown loss {loss!r}: use one of {sorted(_LOSSES)} or a loss object")


# --------------------------------------------------------------------------------------------- data
def _extract(data, model):
    """Arrays from a pydso dataset: u (E,T,nu), y (E,T,ny), ts (T,), dt, measured state or None."""
    import xarray as xr

    if not isinstance(data, xr.Dataset):
        raise SysIdError(f"data must be a pydso dataset (xarray.Dataset), got {type(data).__name__}")
    if "output" not in data.data_vars:
        raise SysIdError(
            f"dataset has no 'output' variable (has {sorted(data.data_vars)}): sysid compares the model output "
            "with the recorded output"
        )
    y = np.asarray(data["output"].transpose("episode", "time", ...).values, dtype=float)
    if y.ndim == 2:
        y = y[..., None]
    E, T, ny = y.shape
    if "input" in data.data_vars:
        u = np.asarray(data["input"].transpose("episode", "time", ...).values, dtype=float)
        if u.ndim == 2:
            u = u[..., None]
        if u.shape[:2] != (E, T):
            raise SysIdError(f"'input' has shape {u.shape} but 'output' has {(E, T)} episodes x time samples")
    elif model.autonomous:
        u = np.zeros((E, T, 0))
    else:
        raise SysIdError(
            f"dataset has no 'input' variable (has {sorted(data.data_vars)}): sysid drives the model with the "
            "recorded input (build the model with autonomous=True for a system without input)"
        )
    if T > 1 and np.isnan(u[:, -1]).any() and np.isfinite(u[:, :-1]).all():
        u = u.copy()
        u[:, -1] = u[:, -2]  # schema convention: the input of the last (unused) step may be NaN
    if "mask" in data.data_vars and not np.asarray(data["mask"].values, bool).all():
        raise SysIdError(
            "dataset has ragged episodes ('mask' is False somewhere): sysid needs complete, equal-length "
            "episodes; split or trim them first"
        )
    for name, arr in (("input", u), ("output", y)):
        bad = ~np.isfinite(arr)
        if bad.any():
            e, t, c = np.argwhere(bad)[0]
            raise SysIdError(
                f"variable {name!r} has {int(bad.sum())} NaN/inf sample(s), first at episode {e}, time index {t}, "
                f"channel {c}: remove or interpolate them before identification"
            )
    if T < 3:
        raise SysIdError(f"dataset has only {T} time samples; sysid needs at least 3")
    if "time" in data.coords:
        ts = np.asarray(data["time"].values, dtype=float)
        d = np.diff(ts)
        dt = float(np.median(d))
        if not (np.isfinite(dt) and dt > 0) or np.max(np.abs(d - dt)) > 1e-6 * abs(dt):
            raise SysIdError(
                f"mismatched sample times: the 'time' coordinate is not uniformly spaced (steps from {d.min():g} "
                f"to {d.max():g}); resample the data to one sample time"
            )
    else:
        dt = float(data.attrs.get("dt", 1.0))
        ts = np.arange(T) * dt
    if "dt" in data.attrs and abs(float(data.attrs["dt"]) - dt) > 1e-6 * dt:
        raise SysIdError(f"mismatched sample times: attrs['dt'] = {data.attrs['dt']} but the time coordinate has {dt}")
    if isinstance(model, DiscreteModel) and model.dt is not None and abs(model.dt - dt) > 1e-9 * dt:
        raise SysIdError(f"mismatched sample times: the discrete model was built for dt = {model.dt}, data have {dt}")
    xs = None
    if "state" in data.data_vars:
        xm = np.asarray(data["state"].transpose("episode", "time", ...).values, dtype=float)
        if xm.ndim == 3 and xm.shape[-1] == model.n_states and np.all(np.isfinite(xm)):
            xs = xm
    return u, y, ts, dt, xs


# --------------------------------------------------------------------------------------------- problem
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
            from .._errors import DivergenceError

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


# --------------------------------------------------------------------------------------------- joint fits
@dataclasses.dataclass
class JointSysIdResult:
    """Outcome of :func:`fit_joint`: one least-squares fit over all experiments.

    The *joint vector* is ``names``: the shared scalar parameters first (``shared_names``), then for each
    experiment ``i`` its own scalar parameters named ``'{name}@{i}'`` (``local_names`` in model order);
    ``estimate``/``stderr``/``ci_low``/``ci_high``/``cov`` are over that vector (physical units; the covariance
    is :math:`\\hat\\sigma^2 (J^\\top J)^{-1}` of the stacked simulation residuals of all experiments over the
    shared, per-experiment and initial-state unknowns, by the delta method; 95% intervals with Student's t on
    ``dof = n_samples - n_unknowns``). ``sigma2`` and ``noise_std`` are pooled over experiments.

    Per experiment: ``per_experiment[i]`` (also :meth:`experiment`) is a :class:`SysIdResult` view with all of
    the model's parameters (the shared ones with the joint estimate and interval), its initial states,
    simulated outputs and metrics; ``rmse``/``nrmse``/``fit_percent`` are ``(experiment, output)``;
    ``experiment_cost[i]`` is ``0.5 * sum r_i^2`` of its scaled simulation residuals.
    """

    experiments: list
    names: list
    shared_names: list
    local_names: list
    estimate: np.ndarray
    stderr: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    cov: np.ndarray
    per_experiment: list
    sigma2: float
    noise_std: np.ndarray
    rmse: np.ndarray
    nrmse: np.ndarray
    fit_percent: np.ndarray
    experiment_cost: np.ndarray
    cost: float
    n_steps: int
    converged: bool
    message: str
    loss: str
    n_samples: int
    dof: int

    def experiment(self, i: int | str) -> SysIdResult:
        """The :class:`SysIdResult` view of experiment ``i`` (index or id)."""
        return self.per_experiment[self.experiments.index(i) if isinstance(i, str) else i]

    def shared_estimates(self) -> dict:
        """``{name: estimate}`` of the shared scalar parameters."""
        ns = len(self.shared_names)
        return {n: float(v) for n, v in zip(self.shared_names, self.estimate[:ns], strict=True)}

    def local_estimates(self) -> dict:
        """``{name: array (experiment,)}`` of the per-experiment scalar parameters."""
        ns, nl = len(self.shared_names), len(self.local_names)
        loc = np.asarray(self.estimate[ns:]).reshape(len(self.experiments), nl)
        return {n: loc[:, j].copy() for j, n in enumerate(self.local_names)}

    def as_dict(self) -> dict:
        return {"shared": self.shared_estimates(), "local": self.local_estimates()}

    def to_dataset(self):
        """The results as an ``xarray.Dataset`` in the layout of :func:`pydso.distributed.fit_many`.

        ``estimate``/``stderr``/``ci_low``/``ci_high`` are ``(experiment, parameter)`` over *all* model
        parameters; a shared parameter has the same (joint) value and interval in every row and is flagged by
        the boolean coordinate ``shared(parameter)``. Per experiment: ``rmse``/``nrmse``/``fit_percent``
        ``(experiment, output_dim)``, ``cost`` (its share of the joint cost), ``status``, ``error``, ``n_steps``
        and ``wall_s`` (NaN here: the joint fit is one solve). ``cov(joint_row, joint_col)`` is the covariance
        over the joint vector (coordinates: :attr:`names`). Attributes: ``joint`` (True), ``shared`` (scalar
        names), ``sigma2``, ``dof``, ``n_samples``, ``loss``, ``converged``, ``message``, ``total_cost``.
        """
        import xarray as xr

        per = self.per_experiment
        names = list(per[0].names)
        E = len(per)
        data = {
            k: (("experiment", "parameter"), np.stack([np.asarray(getattr(r, k), float) for r in per]))
            for k in ("estimate", "stderr", "ci_low", "ci_high")
        }
        for k in ("rmse", "nrmse", "fit_percent"):
            data[k] = (("experiment", "output_dim"), np.asarray(getattr(self, k), float))
        status = "ok" if self.converged else "not_converged"
        data.update(
            cost=("experiment", np.asarray(self.experiment_cost, float)),
            n_steps=("experiment", np.full(E, self.n_steps, dtype=np.int64)),
            wall_s=("experiment", np.full(E, np.nan)),
            status=("experiment", np.array([status] * E, dtype=str)),
            error=("experiment", np.array(["" if self.converged else self.message] * E, dtype=str)),
            cov=(("joint_row", "joint_col"), np.asarray(self.cov, float)),
        )
        return xr.Dataset(
            data,
            coords={
                "experiment": np.array([str(e) for e in self.experiments], dtype=str),
                "parameter": np.array(names, dtype=str),
                "shared": ("parameter", np.array([n in self.shared_names for n in names], dtype=bool)),
                "joint_row": np.array(self.names, dtype=str),
                "joint_col": np.array(self.names, dtype=str),
            },
            attrs={
                "joint": True,
                "shared": list(self.shared_names),
                "sigma2": float(self.sigma2),
                "dof": int(self.dof),
                "n_samples": int(self.n_samples),
                "loss": str(self.loss),
                "converged": bool(self.converged),
                "message": str(self.message),
                "total_cost": float(self.cost),
            },
        )

    def summary(self) -> str:
        ns = len(self.shared_names)
        lines = [f"joint fit of {len(self.experiments)} experiment(s)", "shared parameters:"]
        lines.append(f"{'parameter':>14} {'estimate':>13} {'stderr':>11} {'95% CI':>27}")
        for j in range(ns):
            lines.append(
                f"{self.names[j]:>14} {self.estimate[j]:13.6g} {self.stderr[j]:11.3g}   "
                f"[{self.ci_low[j]:11.5g}, {self.ci_high[j]:11.5g}]"
            )
        if self.local_names:
            lines.append("per-experiment parameters (estimate +- stderr):")
            head = f"{'experiment':>14}" + "".join(f" {n:>22}" for n in self.local_names)
            lines.append(head)
            for i, r in enumerate(self.per_experiment):
                d = dict(zip(r.names, zip(r.estimate, r.stderr, strict=True), strict=True))
                cells = "".join(f" {d[n][0]:12.6g} +- {d[n][1]:6.2g}" for n in self.local_names)
                lines.append(f"{str(self.experiments[i])[-14:]:>14}{cells}")
        lines.append(
            f"loss={self.loss} converged={self.converged} steps={self.n_steps} sigma2={self.sigma2:.4g} "
            f"NRMSE={np.array2string(self.nrmse.mean(axis=0), precision=4)} (mean over experiments)"
        )
        return "\n".join(lines)


class JointSysIdProblem(SysIdProblem):
    """One identification problem over several experiments with shared and per-experiment parameters.

    Built from one :class:`SysIdProblem` per experiment (same model, loss and options); these must have equal
    shapes — the same number of episodes, samples and channels (shorter or ragged records are refused: trim
    or split them first; padding with masks is not implemented). The unconstrained vector is
    ``[shared | local (experiment, n_local) | initial states (experiment, ...) | segment states | log noise]``;
    :meth:`residuals` maps it to every experiment's own vector and ``jax.vmap``-s the per-experiment residual
    function over the stacked data (leading experiment axis), so every loss, transform, solver and the
    covariance code of :class:`SysIdProblem` apply unchanged. Output scaling is pooled over experiments
    (default: the standard deviation of each output over all experiments) so residuals are commensurate.
    """

    def __init__(
        self,
        model,
        datasets,
        *,
        shared=(),
        loss="simulation",
        params=None,
        x0=None,
        output_scale=None,
        transforms=None,
        experiment_ids=None,
    ):
        import xarray as xr

        if isinstance(datasets, xr.Dataset):
            n = int(datasets.sizes.get("episode", 1))
            if "episode" in datasets.dims:
                datasets = [datasets.isel(episode=[e]) for e in range(n)]
                ids = [f"episode{e}" for e in range(n)]
            else:
                datasets, ids = [datasets], ["experiment0"]
        else:
            datasets = list(datasets)
            ids = [f"experiment{i}" for i in range(len(datasets))]
        if not datasets:
            raise SysIdError("fit_joint needs at least one experiment (dataset)")
        if experiment_ids is not None:
            ids = [str(i) for i in experiment_ids]
            if len(ids) != len(datasets) or len(set(ids)) != len(ids):
                raise SysIdError(
                    f"experiment_ids must be {len(datasets)} unique ids (one per experiment), got {experiment_ids!r}"
                )
        self.experiment_ids = ids
        probs = []
        for i, ds in enumerate(datasets):
            try:
                probs.append(
                    SysIdProblem(
                        model,
                        ds,
                        loss=loss,
                        params=params,
                        x0=x0,
                        output_scale=1.0 if output_scale is None else output_scale,
                        transforms=transforms,
                    )
                )
            except SysIdError as e:
                raise SysIdError(f"experiment {ids[i]!r}: {e}") from e
        base = probs[0]
        for i, p in enumerate(probs[1:], 1):
            if (p.E, p.T, p.ny, p.nu) != (base.E, base.T, base.ny, base.nu) or any(
                p.arrays[k].shape != v.shape for k, v in base.arrays.items()
            ):
                raise SysIdError(
                    "joint fits need experiments of equal shape (they are stacked and vmapped; padding is not "
                    f"implemented): experiment {ids[i]!r} has {p.E} episode(s) x {p.T} samples x {p.ny} "
                    f"output(s) x {p.nu} input(s), experiment {ids[0]!r} has {base.E} x {base.T} x {base.ny} x "
                    f"{base.nu}; trim or split the records to one length"
                )
        if output_scale is None:
            ally = np.concatenate([p.y_np.reshape(-1, p.ny) for p in probs])
            sc = np.std(ally, axis=0)
            sc = jnp.asarray(np.where(sc > 0, sc, 1.0))
            for p in probs:
                p.arrays["scale"] = sc
        self.base, self.J = base, len(probs)
        self.model, self.loss, self.space = model, base.loss, base.space
        self.E, self.T, self.ny, self.nu, self.dt = base.E, base.T, base.ny, base.nu, base.dt
        self.y_np = np.stack([p.y_np for p in probs])

        # shared / local split of the scalar parameters (model order)
        if isinstance(shared, str):
            shared = [s.strip() for s in shared.split(",") if s.strip()]
        sp = self.space
        leaf_idx, i0 = {}, 0
        for n, s in zip(sp.leaf_names, sp.sizes, strict=True):
            leaf_idx[n] = list(range(i0, i0 + s))
            i0 += s
        chosen: set[int] = set()
        for s in shared:
            if s in leaf_idx:
                chosen.update(leaf_idx[s])
            elif s in sp.names:
                chosen.add(sp.names.index(s))
            else:
                avail = sp.leaf_names if sp.leaf_names == sp.names else sorted(set(sp.leaf_names) | set(sp.names))
                raise SysIdError(f"unknown shared parameter {s!r}: the model's parameters are {avail}")
        self.shared_idx = np.array(sorted(chosen), dtype=int)
        self.local_idx = np.array([i for i in range(sp.size) if i not in chosen], dtype=int)
        self._inv_perm = np.argsort(np.concatenate([self.shared_idx, self.local_idx]))
        self.shared_names = [sp.names[i] for i in self.shared_idx]
        self.local_names = [sp.names[i] for i in self.local_idx]
        ns, nl, J = len(self.shared_idx), len(self.local_idx), self.J
        self.n_shared, self.n_local = ns, nl
        self.n_theta = ns + J * nl
        self.n_x0 = J * base.n_x0
        self.n_seg = J * getattr(base, "n_seg", 0)
        self.names = self.shared_names + [f"{n}@{i}" for i in range(J) for n in self.local_names]

        nth, nx0, nseg = base.n_theta, base.n_x0, getattr(base, "n_seg", 0)
        Z = np.stack([np.asarray(p.z0) for p in probs])  # (J, per-experiment vector)
        parts = [Z[0, :nth][self.shared_idx], Z[:, :nth][:, self.local_idx].ravel()]
        parts += [Z[:, nth : nth + nx0].ravel(), Z[:, nth + nx0 : nth + nx0 + nseg].ravel()]
        if isinstance(self.loss, GaussianNLL):
            parts.append(np.zeros(self.ny))  # one log noise std per output, shared by all experiments
        self.z0 = jnp.asarray(np.concatenate(parts))
        self.arrays = {k: jnp.stack([p.arrays[k] for p in probs]) for k in base.arrays}
        self.problems = probs

    # ---- the joint vector and the per-experiment vectors
    def _per_experiment(self, w):
        """(experiment, per-experiment vector) from the joint vector ``w`` (its core prefix, or the core plus
        segment states; trailing log noise levels are not part of it)."""
        J, ns, nl = self.J, self.n_shared, self.n_local
        parts = [self._theta_blocks(w)]
        off, nx0, nseg = ns + J * nl, self.base.n_x0, getattr(self.base, "n_seg", 0)
        parts.append(w[off : off + J * nx0].reshape(J, nx0))
        off += J * nx0
        if nseg and w.shape[0] >= off + J * nseg:
            parts.append(w[off : off + J * nseg].reshape(J, nseg))
        return jnp.concatenate(parts, axis=1)

    def _theta_blocks(self, w):
        """(experiment, scalar parameter in model order), unconstrained, from the joint vector's first block."""
        J, ns, nl = self.J, self.n_shared, self.n_local
        th = jnp.concatenate([jnp.broadcast_to(w[:ns], (J, ns)), w[ns : ns + J * nl].reshape(J, nl)], axis=1)
        return th[:, self._inv_perm]

    def _joint_index(self, i):
        """Positions in the joint parameter block of experiment ``i``'s scalar parameters (model order)."""
        pos = np.empty(self.space.size, dtype=int)
        pos[self.shared_idx] = np.arange(self.n_shared)
        pos[self.local_idx] = self.n_shared + i * self.n_local + np.arange(self.n_local)
        return pos

    def _physical_flat(self, zt):
        phys = jax.vmap(self.space.physical_flat)(self._theta_blocks(zt))
        return jnp.concatenate([phys[0, self.shared_idx], phys[:, self.local_idx].ravel()])

    def simulate_outputs(self, z, arrays):
        """Simulated outputs (experiment, episode, time, output)."""
        return jax.vmap(self.base.simulate_outputs)(self._per_experiment(z), arrays)

    def simulation_residuals(self, z, arrays):
        return jax.vmap(self.base.simulation_residuals)(self._per_experiment(z), arrays).ravel()

    def residuals(self, z, arrays=None):
        """Stacked residual vectors of all experiments (experiment-major) at the joint vector ``z``."""
        arrays = self.arrays if arrays is None else arrays
        return jax.vmap(self.base.residuals)(self._per_experiment(z), arrays).ravel()

    def _key(self, solver, extra):
        return ("joint", self.base._key(solver, extra), self.J, tuple(self.shared_idx.tolist()), self.z0.shape)

    def _post_key(self):
        return ("joint", *self.base._post_key(), self.J, tuple(self.shared_idx.tolist()))

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
    ) -> JointSysIdResult:
        """Solve the joint problem (same solvers as :meth:`SysIdProblem.fit`); return a :class:`JointSysIdResult`."""
        s = self._solve(solver, rtol, atol, max_steps, optimizer, steps, z0)
        z, est, se, q, cov = s["z"], s["estimate"], s["stderr"], s["q"], s["cov"]
        J, E, nx = self.J, self.E, self.model.n_states
        zj = np.asarray(self._per_experiment(z[: self.n_theta + self.n_x0]))
        r = s["r"].reshape(J, -1)
        per, mets = [], []
        for i in range(J):
            idx = self._joint_index(i)
            theta = self.space.unflatten(jnp.asarray(zj[i, : self.space.size]))
            x0 = zj[i, self.space.size :].reshape(E, nx) if self.model.estimate_x0 else np.asarray(self.arrays["x0"][i])
            m = _metrics(s["ys"][i], self.y_np[i])
            mets.append(m)
            per.append(
                SysIdResult(
                    names=list(self.space.names),
                    estimate=est[idx],
                    stderr=se[idx],
                    ci_low=est[idx] - q * se[idx],
                    ci_high=est[idx] + q * se[idx],
                    cov=cov[np.ix_(idx, idx)],
                    params=jax.tree.map(lambda v: np.asarray(v) if eqx.is_array(v) else v, theta),
                    x0=np.asarray(x0),
                    sigma2=s["sigma2"],
                    rmse=m[0],
                    nrmse=m[1],
                    fit_percent=m[2],
                    cost=0.5 * float(r[i] @ r[i]),
                    n_steps=s["n_steps"],
                    converged=s["converged"],
                    message=s["message"],
                    loss=self.loss.name,
                    y_sim=s["ys"][i],
                    n_samples=s["n_samples"],
                    dof=s["dof"],
                    noise_std=s["noise_std"],
                )
            )
        return JointSysIdResult(
            experiments=list(self.experiment_ids),
            names=list(self.names),
            shared_names=list(self.shared_names),
            local_names=list(self.local_names),
            estimate=est,
            stderr=se,
            ci_low=est - q * se,
            ci_high=est + q * se,
            cov=cov,
            per_experiment=per,
            sigma2=s["sigma2"],
            noise_std=s["noise_std"],
            rmse=np.stack([m[0] for m in mets]),
            nrmse=np.stack([m[1] for m in mets]),
            fit_percent=np.stack([m[2] for m in mets]),
            experiment_cost=np.array([p.cost for p in per]),
            cost=s["cost"],
            n_steps=s["n_steps"],
            converged=s["converged"],
            message=s["message"],
            loss=self.loss.name,
            n_samples=s["n_samples"],
            dof=s["dof"],
        )


def fit_joint(
    model,
    datasets,
    *,
    shared=(),
    loss="simulation",
    params=None,
    x0=None,
    output_scale=None,
    transforms=None,
    experiment_ids=None,
    solver: str = "lm",
    **solver_options,
) -> JointSysIdResult:
    """Identify ``model`` jointly from several experiments: parameters named in ``shared`` are common to all
    experiments, the others (and the initial states, if estimated) are per experiment.

    ``datasets``: a list of pydso datasets (each one experiment; its episodes share that experiment's
    parameters, with one initial state each) or one dataset (each episode one experiment). All experiments
    must have the same shape (episodes x samples x channels): they are stacked and the per-experiment residual
    function is vmapped over them — one least-squares problem, solved by the same Levenberg–Marquardt machinery
    as :func:`fit`. ``shared``: leaf names (``'k3'``; an array leaf shares all its elements) or scalar names
    (``'A[0]'``), or a comma-separated string; an unknown name raises :class:`SysIdError`. ``experiment_ids``
    names the experiments. Other arguments as for :func:`fit` (the initial guesses are the same for every
    experiment; ``output_scale`` defaults to the pooled standard deviation of each output).
    """
    prob = JointSysIdProblem(
        model,
        datasets,
        shared=shared,
        loss=loss,
        params=params,
        x0=x0,
        output_scale=output_scale,
        transforms=transforms,
        experiment_ids=experiment_ids,
    )
    return prob.fit(solver=solver, **solver_options)
