r"""Gradient estimators and the building blocks of learning from data (DESIGN.md §1.1–1.2, 1.5–1.8).

One job per module:

- ``_base``: :class:`Estimate`, :class:`AbstractEstimator`.
- ``_score``: the score gradient — one implementation (:func:`per_episode_score_gradients`) behind the on-policy
  :class:`Score` / :func:`score_gradient` and the off-policy :func:`offpolicy_gradient`.
- ``_pathwise``: :class:`Pathwise` / :func:`pathwise_gradient`.
- ``_distributed``: :func:`distributed_estimate`, :func:`distributed_objective` (over a Dask cluster, reduced exactly).
- ``_baselines``: :class:`NoBaseline`, :class:`MeanBaseline`, :class:`StateValueBaseline` (on- and off-policy).
- ``_logged``: :class:`LoggedBatch` and its sources (rollouts, stored datasets), costs and densities on a batch.
- ``_weights``: importance weights, effective sample sizes, :class:`WeightedReturns`, streaming sums.
- ``_values``: value fitting (IS Monte Carlo, off-policy LSTD(λ), networks).
- ``_surrogate``: the proximal surrogate (:func:`prepare`, :func:`surrogate`, :func:`tabular_surrogate`).
- ``_fisher``: Fisher-vector products, conjugate gradients, natural-gradient directions.
- ``_hessian``: Hessian-vector products (score and pathwise forms) and the sampled local model of Newton–CG.
"""

from ._base import AbstractEstimator as AbstractEstimator
from ._base import Estimate as Estimate
from ._base import jit_estimate as jit_estimate
from ._base import mean_and_stderr as mean_and_stderr
from ._baselines import AbstractBaseline as AbstractBaseline
from ._baselines import MeanBaseline as MeanBaseline
from ._baselines import NoBaseline as NoBaseline
from ._baselines import StateValueBaseline as StateValueBaseline
from ._baselines import check_baseline as check_baseline
from ._distributed import distributed_estimate as distributed_estimate
from ._distributed import distributed_objective as distributed_objective
from ._fisher import batch_fisher_vector_product as batch_fisher_vector_product
from ._fisher import batch_transitions as batch_transitions
from ._fisher import compatible_natural_gradient as compatible_natural_gradient
from ._fisher import conjugate_gradient as conjugate_gradient
from ._fisher import fisher_vector_product as fisher_vector_product
from ._fisher import natural_gradient_direction as natural_gradient_direction
from ._fisher import solve_natural as solve_natural
from ._hessian import LocalModel as LocalModel
from ._hessian import hessian_estimator as hessian_estimator
from ._hessian import hessian_vector as hessian_vector
from ._hessian import local_model as local_model
from ._logged import DEFAULT_EPISODES_PER_CHUNK as DEFAULT_EPISODES_PER_CHUNK
from ._logged import LoggedBatch as LoggedBatch
from ._logged import absorbed as absorbed
from ._logged import as_batch as as_batch
from ._logged import concatenate_batches as concatenate_batches
from ._logged import empty_batch as empty_batch
from ._logged import is_dataset as is_dataset
from ._logged import iter_batches as iter_batches
from ._logged import setting_weights as setting_weights
from ._logged import step_costs as step_costs
from ._logged import terminal_costs as terminal_costs
from ._logged import transition_log_probs as transition_log_probs
from ._pathwise import Pathwise as Pathwise
from ._pathwise import pathwise_gradient as pathwise_gradient
from ._score import Score as Score
from ._score import offpolicy_gradient as offpolicy_gradient
from ._score import offpolicy_objective as offpolicy_objective
from ._score import per_episode_score_gradients as per_episode_score_gradients
from ._score import score_advantages as score_advantages
from ._score import score_gradient as score_gradient
from ._select import as_estimator as as_estimator
from ._surrogate import SurrogateData as SurrogateData
from ._surrogate import prepare as prepare
from ._surrogate import surrogate as surrogate
from ._surrogate import tabular_surrogate as tabular_surrogate
from ._values import LinearValue as LinearValue
from ._values import discount as discount
from ._values import fit_differential_value as fit_differential_value
from ._values import fit_value_linear as fit_value_linear
from ._values import fit_value_network as fit_value_network
from ._weights import StreamingMoments as StreamingMoments
from ._weights import WeightedReturns as WeightedReturns
from ._weights import effective_sample_size as effective_sample_size
from ._weights import ess_report as ess_report
from ._weights import importance_weights as importance_weights
from ._weights import log_ratios as log_ratios
from ._weights import weighted_returns as weighted_returns
