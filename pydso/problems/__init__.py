"""Problem constructors: applications of DSO built as problems (DESIGN.md §1 table).

Currently: system identification (:mod:`pydso.problems.sysid`).
"""

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
