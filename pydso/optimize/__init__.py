r"""Optimisation of :math:`J(\theta)`: :func:`minimize` and its step strategies (DESIGN.md §1.5–1.7).

``minimize(problem, theta, *, key, method=Gradient(), steps=100, ...)`` runs one loop (keys, checkpoint and exact
resume, progress bar, divergence guard, callback) with any method: :class:`Gradient` (optax on Monte-Carlo
gradients), :class:`NaturalGradient`, :class:`Proximal`, :class:`PolicyIteration` (the data methods, which can also
learn from a fixed log: ``data=``, or one :func:`improve`), :class:`GaussNewton` and :class:`LevenbergMarquardt`
(least squares).
"""

from ._base import AbstractLeastSquares as AbstractLeastSquares
from ._base import AbstractMethod as AbstractMethod
from ._base import StepStats as StepStats
from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._gradient import Gradient as Gradient
from ._improve import AbstractDataMethod as AbstractDataMethod
from ._improve import improve as improve
from ._least_squares import GaussNewton as GaussNewton
from ._least_squares import LeastSquaresSolution as LeastSquaresSolution
from ._least_squares import LevenbergMarquardt as LevenbergMarquardt
from ._least_squares import solve_least_squares as solve_least_squares
from ._minimize import OptimizeResult as OptimizeResult
from ._minimize import StepInfo as StepInfo
from ._minimize import minimize as minimize
from ._natural import NaturalGradient as NaturalGradient
from ._policy_iteration import PolicyIteration as PolicyIteration
from ._policy_iteration import lookahead_improve as lookahead_improve
from ._proximal import Proximal as Proximal
