r"""Optimisation of :math:`J(\theta)`: :func:`minimize` and its step strategies (DESIGN.md §1.5–1.7).

``minimize(problem, theta, *, key, method=Gradient(), steps=100, ...)`` runs one loop (keys, checkpoint and exact
resume, progress bar, divergence guard, callback) with any method: :class:`Gradient` (optax on Monte-Carlo
gradients), :class:`NaturalGradient`, :class:`Proximal`, :class:`PolicyIteration` (the data methods, which can also
learn from a fixed log: ``data=``, or one :func:`improve`), :class:`GaussNewton` and :class:`LevenbergMarquardt`
(least squares), :class:`NewtonCG` (trust-region Newton on sampled Hessian-vector products).
"""

from ._base import AbstractLeastSquares as AbstractLeastSquares
from ._base import AbstractMethod as AbstractMethod
from ._base import StepStats as StepStats
from ._certified import AbstractImprovementBound as AbstractImprovementBound
from ._certified import BootstrapBound as BootstrapBound
from ._certified import CertifiedResult as CertifiedResult
from ._certified import ESSBudget as ESSBudget
from ._certified import StudentTBound as StudentTBound
from ._certified import certified_improve as certified_improve
from ._certified import episode_terms as episode_terms
from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import run_fingerprint as run_fingerprint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._gradient import Gradient as Gradient
from ._improve import AbstractDataMethod as AbstractDataMethod
from ._improve import improve as improve
from ._least_squares import RESULT_NAMES as RESULT_NAMES
from ._least_squares import GaussNewton as GaussNewton
from ._least_squares import LeastSquaresSolution as LeastSquaresSolution
from ._least_squares import LevenbergMarquardt as LevenbergMarquardt
from ._least_squares import gradient_cosine as gradient_cosine
from ._least_squares import result_code as result_code
from ._least_squares import result_message as result_message
from ._least_squares import solve_least_squares as solve_least_squares
from ._least_squares import solve_least_squares_batch as solve_least_squares_batch
from ._least_squares import solve_least_squares_many as solve_least_squares_many
from ._minimize import OptimizeResult as OptimizeResult
from ._minimize import StepInfo as StepInfo
from ._minimize import minimize as minimize
from ._natural import NaturalGradient as NaturalGradient
from ._newton import NewtonCG as NewtonCG
from ._newton import steihaug_cg as steihaug_cg
from ._policy_iteration import PolicyIteration as PolicyIteration
from ._policy_iteration import lookahead_improve as lookahead_improve
from ._proximal import Proximal as Proximal
from ._proximal import td_discount as td_discount
