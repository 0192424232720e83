r"""Optimisation of :math:`J(\theta)`: :func:`minimize` and its step strategies (DESIGN.md §1.5–1.7)."""

from ._minimize import OptimizeResult as OptimizeResult
from ._minimize import StepInfo as StepInfo
from ._minimize import minimize as minimize
from ._policy_iteration import lookahead_improve as lookahead_improve
from ._policy_iteration import policy_iteration as policy_iteration
from ._proximal import Proximal as Proximal
from ._proximal import SurrogateData as SurrogateData
from ._proximal import improve as improve
from ._proximal import prepare as prepare
from ._proximal import surrogate as surrogate
from ._proximal import tabular_surrogate as tabular_surrogate
