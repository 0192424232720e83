"""Suite-wide settings: tests run under JAX's strict dtype promotion, as diffrax's and equinox's suites do, so that an
implicit int/float or float32/float64 mix inside pydso fails loudly instead of silently changing precision.

Two exceptions, where strictness would fight other libraries' own behaviour rather than check ours:

* modules whose tests run optax optimisers (``minimize``, the improvement methods, network value fits, sysid's optax
  and BFGS paths): optax's Adam bias correction computes ``decay ** count`` with an int32 ``count``
  (``optax.tree_utils.tree_bias_correction``), which strict promotion rejects;
* rank promotion stays at JAX's default: pydso takes user callables written in NumPy broadcasting style (costs such
  as ``x @ x + 0.1 * u**2``, weights broadcast over episodes), and the tests exercise them as users write them.
"""

import jax
import pytest

STANDARD_PROMOTION_MODULES = {
    "test_optimize",
    "test_proximal",
    "test_policy_iteration",
    "test_natural",
    "test_offpolicy",
    "test_problems",
    "test_sysid",
    "test_sysid_joint",
    "test_readme",
    "test_notebooks",
    "test_pendulum_gym",
}


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    if request.module.__name__.rsplit(".", 1)[-1] in STANDARD_PROMOTION_MODULES:
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield
