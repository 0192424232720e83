"""Bad input to the off-policy estimators and data methods gets a pydso error that names the offending argument;
overflowing estimates raise :class:`pydso.DivergenceError` instead of returning NaN or inf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pydso
from pydso import data
from pydso.estimators import (
    ess_report,
    natural_gradient_direction,
    offpolicy_gradient,
    offpolicy_objective,
)

N, T = 4, 5
THETA = {"a": 0.5 * jnp.eye(2)}


def chain():
    return pydso.Problem(
        pydso.GaussianChain(lambda x, th: th["a"] @ x, 0.1),
        lambda x, th: x @ x,
        pydso.Episodic(0.9, T - 1),
        pydso.Normal(jnp.zeros(2), 1.0),
    )


def logged(d=2, n_time=T, behavior_logp=True):
    rng = np.random.default_rng(0)
    state = rng.normal(size=(N, n_time, d))
    blp = None
    if behavior_logp:
        blp = np.full((N, n_time), -1.0)
        blp[:, -1] = np.nan
    return data.make_dataset(state, behavior_logp=blp)


def deterministic():
    return pydso.Problem(
        pydso.DeterministicMap(lambda x, th: th["a"] @ x),
        lambda x, th: x @ x,
        pydso.Episodic(0.9, T - 1),
        pydso.Normal(jnp.zeros(2), 1.0),
    )


CASES = [
    (
        "state-dim-mismatch",
        lambda: offpolicy_objective(chain(), THETA, logged(d=3)),
        pydso.ProblemError,
        r"'state' has 3 features per time step \(state_dim\), but the problem's initial distribution draws states "
        r"of shape \(2,\)",
    ),
    (
        "ess-nan-theta",
        lambda: ess_report(chain(), {"a": jnp.full((2, 2), jnp.nan)}, logged()),
        pydso.ProblemError,
        r"theta\['a'\] contains non-finite",
    ),
    (
        "ess-clip-zero",
        lambda: ess_report(chain(), THETA, logged(), weight_clip=0.0),
        pydso.ProblemError,
        r"weight_clip must be a positive number",
    ),
    (
        "ess-clip-nan",
        lambda: ess_report(chain(), THETA, logged(), weight_clip=float("nan")),
        pydso.ProblemError,
        r"weight_clip must be a positive number",
    ),
    (
        "no-behavior-logp",
        lambda: offpolicy_gradient(chain(), THETA, logged(behavior_logp=False)),
        pydso.ProblemError,
        r"no 'behavior_logp' variable",
    ),
    (
        "data-array",
        lambda: offpolicy_gradient(chain(), THETA, np.ones((N, T, 2))),
        pydso.ProblemError,
        r"data must be a pydso.Trajectories, a LoggedBatch or an xarray.Dataset",
    ),
    (
        "baseline-string",
        lambda: offpolicy_gradient(chain(), THETA, logged(), baseline="mean"),
        pydso.ProblemError,
        r"baseline must be a baseline object",
    ),
    (
        "chunk-zero",
        lambda: offpolicy_objective(chain(), THETA, logged(), episodes_per_chunk=0),
        pydso.ProblemError,
        r"episodes_per_chunk must be a positive integer, got 0",
    ),
    (
        "chunk-negative",
        lambda: ess_report(chain(), THETA, logged(), episodes_per_chunk=-2),
        pydso.ProblemError,
        r"episodes_per_chunk must be a positive integer, got -2",
    ),
    (
        "no-density",
        lambda: offpolicy_objective(deterministic(), THETA, logged()),
        pydso.ProblemError,
        r"the off-policy objective needs a transition log-density",
    ),
    (
        "one-time-index",
        lambda: offpolicy_objective(chain(), THETA, logged(n_time=1, behavior_logp=True)),
        pydso.ProblemError,
        r"at least two time indices",
    ),
    (
        "theta-structure",
        lambda: offpolicy_gradient(chain(), {"b": jnp.eye(2)}, logged()),
        pydso.ProblemError,
        r"theta.*pytree structure",
    ),
    (
        "natural-damping",
        lambda: natural_gradient_direction(chain(), THETA, logged(), damping=-1.0),
        pydso.ProblemError,
        r"damping must be a non-negative finite number, got -1.0",
    ),
    (
        "natural-cg-iters",
        lambda: natural_gradient_direction(chain(), THETA, logged(), cg_iters=0),
        pydso.ProblemError,
        r"cg_iters must be a positive integer, got 0",
    ),
    (
        "ng-learning-rate",
        lambda: pydso.NaturalGradient(learning_rate=-0.1),
        pydso.ProblemError,
        r"NaturalGradient.learning_rate must be a positive",
    ),
    (
        "ng-max-kl",
        lambda: pydso.NaturalGradient(learning_rate=None, max_kl=0.0),
        pydso.ProblemError,
        r"NaturalGradient.max_kl must be a positive",
    ),
    (
        "ng-damping-nan",
        lambda: pydso.NaturalGradient(damping=float("nan")),
        pydso.ProblemError,
        r"NaturalGradient.damping must be a non-negative",
    ),
    (
        "ng-cg-iters",
        lambda: pydso.NaturalGradient(cg_iters=0),
        pydso.ProblemError,
        r"NaturalGradient.cg_iters must be a positive integer",
    ),
    (
        "ng-no-step",
        lambda: pydso.NaturalGradient(learning_rate=None),
        pydso.ProblemError,
        r"needs a learning_rate or a max_kl",
    ),
    (
        "proximal-epochs",
        lambda: pydso.Proximal(epochs=-1),
        pydso.ProblemError,
        r"Proximal.epochs must be a positive integer, got -1",
    ),
    (
        "proximal-minibatch",
        lambda: pydso.Proximal(minibatch=0),
        pydso.ProblemError,
        r"Proximal.minibatch must be a positive integer, got 0",
    ),
    (
        "improve-no-data",
        lambda: pydso.optimize.improve(chain(), THETA, None, key=jax.random.key(0)),
        pydso.ProblemError,
        r"improve needs logged data",
    ),
    (
        "improve-method",
        lambda: pydso.optimize.improve(chain(), THETA, logged(), key=jax.random.key(0), method=pydso.Gradient()),
        pydso.ProblemError,
        r"method must be a method that learns from logged data",
    ),
    (
        "data-method-n-negative",
        lambda: pydso.minimize(chain(), THETA, key=jax.random.key(0), steps=1, method=pydso.Proximal(n=-1)),
        pydso.ProblemError,
        r"Proximal.n must be a non-negative integer, got -1",
    ),
    (
        "data-method-nothing",
        lambda: pydso.minimize(chain(), THETA, key=jax.random.key(0), steps=1, method=pydso.NaturalGradient(n=0)),
        pydso.ProblemError,
        r"NaturalGradient needs fresh episodes \(n > 0\) or a logged dataset \(data=...\)",
    ),
    (
        "data-method-deterministic",
        lambda: pydso.minimize(deterministic(), THETA, key=jax.random.key(0), steps=1, method=pydso.Proximal(n=4)),
        pydso.ProblemError,
        r"Proximal reweights episodes by their transition densities, but DeterministicMap has none",
    ),
]


@pytest.mark.parametrize("make, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_offpolicy_input_names_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_overflowing_importance_weights_raise_divergence_not_inf():
    ds = logged()
    ds["behavior_logp"][:] = np.where(np.isnan(ds["behavior_logp"].values), np.nan, -1e300)  # ratios of e^(1e300)
    with pytest.raises(pydso.DivergenceError, match=r"offpolicy_objective: the estimate at theta is non-finite"):
        offpolicy_objective(chain(), THETA, ds)
    # Clipping the weights is the documented fix: then the same data give a finite estimate.
    j, se = offpolicy_objective(chain(), THETA, ds, weight_clip=10.0)
    assert np.isfinite(j) and np.isfinite(se)
