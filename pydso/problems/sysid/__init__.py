r"""System identification as a DSO problem constructor (the contract of :mod:`pydso.problems`).

The chain is the model driven by the *recorded* input; ``theta`` holds the model parameters and the initial
states; the cost compares the model output with the *recorded* output. Identification is then a (nonlinear)
least-squares problem: :func:`sysid` (also reachable as ``pydso.problems.sysid.sysid``; ``from pydso.problems
import sysid`` gives this subpackage, which is itself callable as the constructor) returns a :class:`SysIdProblem`, an
:class:`~pydso.optimize.AbstractLeastSquares` over the unconstrained vector ``theta`` with ``theta0`` its start.
It is solved by the package's least-squares methods — :class:`pydso.LevenbergMarquardt` (default) or
:class:`pydso.GaussNewton` — either step by step under
``pydso.minimize(p, p.theta0, key=key, method=pydso.LevenbergMarquardt(), steps=...)`` followed by
``p.result(theta)``, or in one compiled loop by ``p.fit()`` / :func:`fit` (the same steps,
:func:`pydso.optimize.solve_least_squares`). ``fit(solver='bfgs' | 'optax')`` minimises the same objective with
BFGS or an optax optimiser (BFGS is the default for the Gaussian NLL, which is not a sum of squares).

Models (any JAX-traceable callables; ``theta`` is the parameter pytree — a dict of physical parameters, an
equinox network, or both: grey-box mixes are just callables that use both):

* :class:`ContinuousModel` — :math:`\dot x = f(t, x, u, \theta)`, :math:`y = h(x, u, \theta)`. The recorded input
  is fed by **zero-order hold** (default: constant over each sample interval, the usual assumption for data from
  a DAC / ADC pair) or by **linear interpolation**. Integration: fixed-step classical RK4 (:class:`pydso.RK4`)
  with ``substeps`` steps per sample interval by the JAX backend's ensemble integrator
  :func:`pydso.backends.jax.fixed_step_ensemble` (default: all episodes as one struct-of-arrays state, one scan,
  fixed shapes, exact for ZOH because the input is constant over every step); ``integrator="diffrax"`` instead
  integrates adaptively (Tsit5 + PID) through :class:`diffrax.LinearInterpolation` of the input (linear input only;
  the reference).
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

Working on real data (all through :func:`fit` / :meth:`SysIdProblem.fit`):

* **multi-start** — ``n_starts=``, ``starts=[guesses]`` or ``sampler=`` (with ``key=``): every start is solved in
  one compiled, ``jax.vmap``-ed Levenberg–Marquardt solve (:func:`pydso.optimize.solve_least_squares_batch`);
  the best by estimation loss is reported, every start in ``result.multistart`` (:class:`MultiStart`).
  ``max_steps``, ``rtol`` and ``atol`` are traced values: changing them never recompiles.
* **fixed parameters** — ``fixed=["k3"]`` or ``{"k3": 0.5, "x0[1]": 0.0}`` holds parameters or initial states
  at given values without rewriting the model; ``transforms`` may name initial states (``"x0"``, ``"x0[i]"``).
* **validation on new data** — ``result.simulate(dataset)`` and ``result.score(dataset, x0="estimate",
  n_init=k)`` (:class:`Score`: RMSE, NRMSE, fit %; the initial state estimated from the first ``k`` samples
  only, or given); ``holdout=`` early stopping and ``regularization=`` L2 weight decay for network weights.
* **honest reports** — intervals computed in the unconstrained coordinates of each transform (they never cross
  a bound); the residual whiteness test (:func:`whiteness_test`: autocorrelation and input cross-correlation
  with their bands) with every fit, a :class:`SysIdWarning` when it fails, and then (``covariance="auto"``)
  the sandwich covariance for AR residuals (:func:`ar_sandwich`); non-identifiable parameters (a
  rank-deficient Jacobian, no degrees of freedom) get infinite intervals, a warning and ``converged=False``;
  ``result.stop_reason`` / ``grad_cosine`` say why the solver stopped and warn when it stopped away from an
  optimum.
* **smooth nonlinearities** for grey-box models of real plants: :func:`smooth_max`, :func:`smooth_min`,
  :func:`smooth_abs`, :func:`smooth_clip` (saturation), :func:`dead_zone`, :func:`overflow`.
* :func:`fit_batch` — many same-shape experiments as one vmapped solve (e.g. Monte-Carlo coverage studies).

Batch fits (:func:`fit_many`, the ``pydso sysid`` command, which reads CSV / NPZ / MAT records directly): one
fit per experiment (or one joint fit) on Dask,
results in a zarr store that is only ever created or replaced if it is a pydso results store.

When not to use it: for systems with significant process noise, the free-run simulation error is biased and
its intervals too narrow; use the prediction loss (with measured states) or a state-estimator problem. For very
long records with chaotic or unstable dynamics, prefer multiple shooting to single shooting.

References: L. Ljung, *System Identification: Theory for the User*, 2nd ed., Prentice Hall 1999 (output-error
and prediction-error methods, asymptotic covariance); H. G. Bock and K. J. Plitt, "A multiple shooting algorithm
for direct solution of optimal control problems", IFAC 1984; J. J. Moré, "The Levenberg–Marquardt algorithm:
implementation and theory", 1978.
"""

import sys as _sys
import types as _types

from ._batch import expand_paths, fit_many, load_model, open_results
from ._diagnostics import Whiteness, ar_sandwich, autocovariance, whiteness_test
from ._errors import SysIdError, SysIdWarning
from ._joint import JointSysIdProblem, JointSysIdResult, fit_joint
from ._losses import GaussianNLL, MultipleShooting, Prediction, Simulation
from ._models import (
    ContinuousModel,
    DiscreteModel,
    finite_difference_states,
    simulate,
    simulate_outputs,
    simulate_states,
)
from ._problem import AbstractSysIdProblem, MultiStart, Score, SysIdProblem, SysIdResult, fit, fit_batch, sysid
from ._smooth import dead_zone, overflow, smooth_abs, smooth_clip, smooth_max, smooth_min

__all__ = [
    "SysIdError",
    "ContinuousModel",
    "DiscreteModel",
    "Simulation",
    "MultipleShooting",
    "Prediction",
    "GaussianNLL",
    "AbstractSysIdProblem",
    "SysIdProblem",
    "SysIdResult",
    "JointSysIdProblem",
    "JointSysIdResult",
    "sysid",
    "fit",
    "fit_joint",
    "finite_difference_states",
    "simulate",
    "simulate_outputs",
    "simulate_states",
    "fit_many",
    "open_results",
    "load_model",
    "expand_paths",
    "SysIdWarning",
    "fit_batch",
    "MultiStart",
    "Score",
    "Whiteness",
    "whiteness_test",
    "ar_sandwich",
    "autocovariance",
    "smooth_max",
    "smooth_min",
    "smooth_abs",
    "smooth_clip",
    "dead_zone",
    "overflow",
]


class _CallableModule(_types.ModuleType):
    """``from pydso.problems import sysid`` gives this subpackage; calling it is the constructor
    :func:`sysid` (``sysid(model, data, loss=...)``), so both readings of the import work."""

    def __call__(self, *args, **kwargs):
        return sysid(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
