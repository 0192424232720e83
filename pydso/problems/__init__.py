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
behavioural cloning            :func:`cloning`               closed loop under the learned policy, imitation loss
                               (module                       on the visited states (expert policy queried there;
                               ``problems/cloning.py``)      demonstrations: tracking loss); least squares over
                                                             fixed keys for Gauss-Newton; :func:`regression` is
                                                             the open-loop baseline
mechanism design               :func:`design`                plant design and policy parameters in one ``theta``,
                               (module                       task cost plus a design cost paid once per episode;
                               ``problems/design.py``)       bounded designs in sigmoid coordinates
control tasks (policy          :mod:`pydso.problems.control` pendulum (Pendulum-v1), cart-pole swing-up,
optimisation)                                                two-link arm reaching: training problem, the task's
                                                             own evaluation, a success criterion; MLP policies
state-estimator learning       :func:`estimation`            (true state, filter state) chain with process and
                               (module                       measurement noise (a density-free
                               ``problems/estimation.py``)   ``ReparameterizedChain``), steady-state estimation
                                                             error as the cost; learned filters vs Kalman / EKF
generative-model tuning        :func:`generative`            finite-horizon, time-varying denoising chain (a DDPM
                               (module                       from :func:`pretrain_ddpm`), terminal reward
                               ``problems/generative.py``)   :math:`-r(x_H)` plus per-step
                                                             :math:`\beta\,\mathrm{KL}` to the pretrained chain
state-action chain (MDP)       :func:`pydso.problems.        chain on (s, a) under a stochastic policy: the score
                               state_action_chain`           is grad log pi (REINFORCE), the chain Fisher Kakade's
=============================  ============================  =====================================================

Policy optimisation needs no constructor beyond :class:`pydso.Problem` itself; :mod:`pydso.problems.control`
builds ready-made tasks (``from pydso.problems import control``; ``control.cart_pole(key=...)``).

Behavioural cloning and mechanism design: ``pydso.problems.cloning(...)`` and ``pydso.problems.design(...)`` are
the constructors (the names are the functions; their modules' public names are re-exported here:
``CloningProblem``, ``regression``, ``DesignProblem``, ...).

State-estimator learning and generative-model tuning: ``pydso.problems.estimation(...)`` and
``pydso.problems.generative(...)`` are the constructors (the names are the functions; their modules'
public names — filters, chains, results — are re-exported here: ``GainObserver``, ``ExtendedKalmanFilter``,
``DDPM``, ``pretrain_ddpm``, ...).

Learning from logs through a model: :func:`pydso.problems.model_based.model_based_improve` identifies the plant
from the log (system identification), optimises the policy by DSO on the identified model and checks the result
against the log with importance weights.

System identification: ``from pydso.problems import sysid`` gives the subpackage, which is callable as its
constructor :func:`pydso.problems.sysid.sysid` (``sysid(model, data, loss=...)`` or ``sysid.sysid(...)``), the
one-call fit :func:`pydso.problems.sysid.fit`; the most used names are re-exported here.
"""

from . import control as control
from ._contract import AbstractConstructedProblem as AbstractConstructedProblem
from .cloning import CloningProblem as CloningProblem
from .cloning import CloningResult as CloningResult
from .cloning import ImitationLeastSquares as ImitationLeastSquares
from .cloning import cloning as cloning
from .cloning import demonstrations as demonstrations
from .cloning import regression as regression
from .control import ControlResult as ControlResult
from .control import ControlTask as ControlTask
from .control import LinearPolicy as LinearPolicy
from .control import MLPPolicy as MLPPolicy
from .design import DesignProblem as DesignProblem
from .design import DesignResult as DesignResult
from .design import design as design
from .estimation import AbstractFilter as AbstractFilter
from .estimation import EstimationProblem as EstimationProblem
from .estimation import EstimationResult as EstimationResult
from .estimation import ExtendedKalmanFilter as ExtendedKalmanFilter
from .estimation import GainObserver as GainObserver
from .estimation import NoisyStateSpace as NoisyStateSpace
from .estimation import estimation as estimation
from .generative import DDPM as DDPM
from .generative import AbstractDenoisingChain as AbstractDenoisingChain
from .generative import DenoisingChain as DenoisingChain
from .generative import GaussianMixture as GaussianMixture
from .generative import GenerativeProblem as GenerativeProblem
from .generative import GenerativeResult as GenerativeResult
from .generative import generative as generative
from .generative import pretrain_ddpm as pretrain_ddpm
from .generative import tilted_weights as tilted_weights
from .model_based import ModelBasedResult as ModelBasedResult
from .model_based import model_based_improve as model_based_improve
from .state_action import StateActionChain as StateActionChain
from .state_action import state_action_chain as state_action_chain
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
from .sysid import SysIdWarning as SysIdWarning
from .sysid import finite_difference_states as finite_difference_states
from .sysid import fit as fit
from .sysid import fit_batch as fit_batch
from .sysid import fit_joint as fit_joint
from .sysid import simulate as simulate
