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

from ._batch import expand_paths, fit_many, load_model, open_results
from ._errors import SysIdError
from ._joint import JointSysIdProblem, JointSysIdResult, fit_joint
from ._losses import GaussianNLL, MultipleShooting, Prediction, Simulation
from ._models import ContinuousModel, DiscreteModel, finite_difference_states, simulate
from ._models import _simulate as _simulate  # private, used by tests and benchmarks
from ._problem import SysIdProblem, SysIdResult, fit, sysid

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
    "fit_many",
    "open_results",
    "load_model",
    "expand_paths",
]
