r"""Problem constructors: the applications of DSO (DESIGN.md §1 table) built as DSO problems.

An application is not an algorithm of its own. It is a **constructor** that turns the user's ingredients (a
model, recorded data, a policy class, a pretrained chain, ...) into a problem that the package's optimiser
solves with its shared methods.

The contract
------------
A constructor returns an :class:`AbstractConstructedProblem` ``p`` with

1. ``p.problem`` — a DSO problem accepted by :func:`pydso.minimize`: either a :class:`pydso.Problem` (a chain
   :math:`P(x'\mid x,\theta)`, a cost :math:`L(x,\theta)`, a setting, an initial distribution), or, for
   deterministic least-squares kinds, an :class:`pydso.optimize.AbstractLeastSquares` with
   ``residuals(theta) -> 1-D array`` and :math:`J(\theta) = \tfrac12\|r(\theta)\|^2`. Usually ``p`` is itself
   the problem (``p.problem is p``).
2. ``p.theta0`` — the initial parameters: a pytree of float arrays in the coordinates the problem is optimised
   in (unconstrained: transforms to physical values belong to the kind, see 3).
3. ``p.result(theta, **info)`` — the kind's report at any ``theta``: physical parameters, the data-dependent
   metrics and uncertainty it is judged by (fit percentage and confidence intervals for system
   identification; imitation loss for cloning; ...). ``info`` records how ``theta`` was obtained.

and whatever else the kind needs as attributes (its data, transforms, metrics). It is solved by the package's
methods — ``pydso.minimize(p.problem, p.theta0, key=key, method=...)`` with a gradient method (pathwise, score,
natural gradient, proximal) for :class:`pydso.Problem` s, or :class:`pydso.LevenbergMarquardt` /
:class:`pydso.GaussNewton` for least squares — and never by a per-kind algorithm. A kind may offer a shortcut
(``p.fit()``) that runs those same methods with its defaults, compiled in one piece.

Constructors validate their inputs once and raise the kind's subclass of :class:`pydso.ProblemError` with a
message that names the offending argument. The recorded data enter in the package's dataset schema
(:mod:`pydso.data`).

Kinds
-----
One subpackage (or module) per kind, each with the same contract:

=============================  ============================  =====================================================
kind                           where                         the problem
=============================  ============================  =====================================================
system identification          :mod:`pydso.problems.sysid`   least squares: the model driven by the recorded
                                                             input vs the recorded output (simulation, multiple
                                                             shooting, prediction error); batch fits on Dask
behavioural cloning            ``pydso.problems.cloning``    closed loop under the learned policy, imitation loss
                               (planned)                     on the visited states (a :class:`pydso.Problem`)
mechanism design               ``pydso.problems.design``     plant (and policy) parameters in ``theta``, task cost
                               (planned)
state-estimator learning       ``pydso.problems.estimation`` (true state, estimate) chain with measurement noise,
                               (planned)                     estimation error as the cost
generative-model tuning        ``pydso.problems.generative`` finite-horizon denoising chain, terminal reward plus
                               (planned)                     per-step KL to the pretrained chain
=============================  ============================  =====================================================

Policy optimisation (control tasks) needs no constructor beyond :class:`pydso.Problem` itself.

System identification: ``from pydso.problems import sysid`` gives the subpackage; its constructor is
:func:`pydso.problems.sysid.sysid` (``sysid.sysid(model, data, loss=...)``), the one-call fit
:func:`pydso.problems.sysid.fit`; the most used names are re-exported here.
"""

from ._contract import AbstractConstructedProblem as AbstractConstructedProblem
from .sysid import ContinuousModel as ContinuousModel
from .sysid import DiscreteModel as DiscreteModel
from .sysid import GaussianNLL as GaussianNLL
from .sysid import JointSysIdProblem as JointSysIdProblem
from .sysid import JointSysIdResult as JointSysIdResult
from .sysid import MultipleShooting as MultipleShooting
from .sysid import Prediction as Prediction
from .sysid import Simulation as Simulation
from .sysid import SysIdError as SysIdError
from .sysid import SysIdProblem as SysIdProblem
from .sysid import SysIdResult as SysIdResult
from .sysid import finite_difference_states as finite_difference_states
from .sysid import fit as fit
from .sysid import fit_joint as fit_joint
from .sysid import simulate as simulate
