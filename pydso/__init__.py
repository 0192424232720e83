"""pydso: Dynamical System Optimization in JAX.

Once a parametric policy controls a plant, the closed loop is an autonomous dynamical system; pydso optimises its
parameters ``theta`` (any pytree) directly. See ``docs/theory.md`` for the maths and DESIGN.md for the architecture.
Importing pydso enables float64 in JAX (set ``PYDSO_X64=0`` before import to keep float32).
"""

from ._config import configure as _configure

_configure()

from . import backends as backends  # noqa: E402
from . import data as data  # noqa: E402
from . import divergences as divergences  # noqa: E402
from . import engine as engine  # noqa: E402
from . import estimators as estimators  # noqa: E402
from . import exact as exact  # noqa: E402
from . import optimize as optimize  # noqa: E402
from . import problems as problems  # noqa: E402
from . import systems as systems  # noqa: E402
from ._errors import DivergenceError as DivergenceError  # noqa: E402
from ._errors import ProblemError as ProblemError  # noqa: E402
from ._errors import StabilityWarning as StabilityWarning  # noqa: E402
from .backends.jax import RK4 as RK4  # noqa: E402
from .data import DatasetError as DatasetError  # noqa: E402
from .engine import Trajectories as Trajectories  # noqa: E402
from .engine import rollout as rollout  # noqa: E402
from .estimators import Estimate as Estimate  # noqa: E402
from .estimators import MeanBaseline as MeanBaseline  # noqa: E402
from .estimators import NoBaseline as NoBaseline  # noqa: E402
from .estimators import Pathwise as Pathwise  # noqa: E402
from .estimators import Score as Score  # noqa: E402
from .estimators import StateValueBaseline as StateValueBaseline  # noqa: E402
from .estimators import distributed_estimate as distributed_estimate  # noqa: E402
from .estimators import distributed_objective as distributed_objective  # noqa: E402
from .estimators import pathwise_gradient as pathwise_gradient  # noqa: E402
from .estimators import score_gradient as score_gradient  # noqa: E402
from .optimize import CertifiedResult as CertifiedResult  # noqa: E402
from .optimize import GaussNewton as GaussNewton  # noqa: E402
from .optimize import Gradient as Gradient  # noqa: E402
from .optimize import LevenbergMarquardt as LevenbergMarquardt  # noqa: E402
from .optimize import NaturalGradient as NaturalGradient  # noqa: E402
from .optimize import NewtonCG as NewtonCG  # noqa: E402
from .optimize import OptimizeResult as OptimizeResult  # noqa: E402
from .optimize import PolicyIteration as PolicyIteration  # noqa: E402
from .optimize import Proximal as Proximal  # noqa: E402
from .optimize import StepInfo as StepInfo  # noqa: E402
from .optimize import certified_improve as certified_improve  # noqa: E402
from .optimize import minimize as minimize  # noqa: E402
from .systems import AverageCost as AverageCost  # noqa: E402
from .systems import Categorical as Categorical  # noqa: E402
from .systems import DeterministicMap as DeterministicMap  # noqa: E402
from .systems import Empirical as Empirical  # noqa: E402
from .systems import Episodic as Episodic  # noqa: E402
from .systems import FiniteHorizon as FiniteHorizon  # noqa: E402
from .systems import Fixed as Fixed  # noqa: E402
from .systems import GaussianChain as GaussianChain  # noqa: E402
from .systems import MarkovChain as MarkovChain  # noqa: E402
from .systems import Normal as Normal  # noqa: E402
from .systems import ODESystem as ODESystem  # noqa: E402
from .systems import Problem as Problem  # noqa: E402
from .systems import ReparameterizedChain as ReparameterizedChain  # noqa: E402
from .systems import SDESystem as SDESystem  # noqa: E402
from .systems import TabularChain as TabularChain  # noqa: E402
from .systems import Uniform as Uniform  # noqa: E402

# pydso.cli and the Dask batch fits (pydso.problems.sysid.fit_many) import dask.distributed on use only.

__version__ = "0.1.0"
