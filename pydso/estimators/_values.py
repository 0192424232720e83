r"""Value fitting from logged transitions: importance-weighted Monte Carlo and off-policy LSTD(λ)
(DESIGN.md §1.7–1.8).

The value of the target chain, :math:`V_\theta(x) = L(x) + \gamma E_\theta[V_\theta(x')]`, is fitted from data
logged under a behaviour chain with the per-transition ratios :math:`r_t = P(x_{t+1}\mid x_t,\theta)/B(x_{t+1}\mid
x_t)`:

* **Monte Carlo** (``method="mc"``): regression on per-decision IS returns :math:`G_t = L_t + \gamma r_t G_{t+1}`
  (Precup et al. 2000), truncated at the logged horizon (bias :math:`O(\gamma^{H-t})`);
* **TD** (``method="td"``): off-policy LSTD(λ) (Bradtke & Barto 1996; Yu 2010, *Convergence of least squares
  temporal difference methods under general conditions*): traces :math:`z_t = d_t\phi_t + \gamma\lambda r_{t-1}
  z_{t-1}`, :math:`A = \sum_t z_t(\phi_t - \gamma r_t \phi_{t+1})^\top`, :math:`b = \sum_t z_t L_t`,
  :math:`V = \phi^\top A^{-1} b`; λ = 0 is importance-weighted TD(0)'s fixed point.

Entering a terminal set bootstraps with the terminal cost. Linear fits (:func:`fit_value_linear`) are closed-form
and stream stored datasets; network fits (:func:`fit_value_network`) use optax on in-memory data.

**Average cost** (:class:`~pydso.AverageCost`, no discount): :func:`fit_value_linear` fits the *differential*
value :math:`h` of :math:`h(x) + J = L(x) + E_\theta[h(x')]` together with the average cost :math:`J`, by
average-cost LSTD(λ) (Tsitsiklis & Van Roy 1999, *Average cost temporal-difference learning*; Yu & Bertsekas 2009):
with traces :math:`z_t = d_t\phi_t + \lambda r_{t-1} z_{t-1}` (:math:`d_t = 1` after the burn-in, 0 before) it
solves the square system

.. math::
    \Big[\sum_t z_t(\phi_t - r_t\phi_{t+1})^\top\Big]\beta + \Big[\sum_t z_t\Big] J = \sum_t z_t L_t,
    \qquad \Big[\sum_t d_t \phi_t\Big]^\top \beta = 0,

i.e. the TD(0)/LSTD fixed point with the average cost estimated jointly (its equation makes the system consistent),
normalised so that :math:`h` has mean zero over the recorded states (the exact normalisation
:math:`\pi^\top h = 0` when the data are on-policy and stationary). :math:`h` is defined up to a constant, which
no gradient or advantage sees. The fit returns a :class:`LinearValue` with ``average_cost`` :math:`\hat J`.
Off-policy data are reweighted per transition (:math:`r_t`); the state weighting then stays the behaviour's, which
is exact for tabular (one-hot) features and an approximation otherwise. :func:`discount` still raises for
settings without a discount: the discounted fits need one.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import check_key, check_positive_int
from .._errors import ProblemError
from .._typing import PyTree
from ..systems import AverageCost, Episodic, Problem
from ._logged import LoggedBatch, absorbed, as_batch, iter_batches, step_costs
from ._weights import importance_weights, log_ratios

__all__ = ["LinearValue", "fit_value_linear", "fit_differential_value", "fit_value_network", "discount"]


def discount(problem: Problem, gamma: float | None = None) -> float:
    r"""The discount :math:`\gamma` of value fitting: ``gamma`` if given, else the problem's
    :class:`~pydso.Episodic` discount; raises :class:`~pydso.ProblemError` for settings without one."""
    if gamma is not None:
        return float(gamma)
    if isinstance(problem.setting, Episodic):
        return float(problem.setting.gamma)
    raise ProblemError(
        f"value fitting needs a discount: the {type(problem.setting).__name__} setting has none; pass gamma=..."
    )


class LinearValue(eqx.Module):
    r"""A linear value function :math:`V(x) = \phi(x)^\top \beta`.

    **Attributes:** ``coef`` :math:`\beta` ``(f,)``; ``features`` :math:`\phi(x) \to (f,)`; ``average_cost``: the
    jointly estimated average cost :math:`\hat J` of a differential (average-cost) fit, else ``None``.

    Callable as ``V(x)`` or ``V(x, theta)`` (theta is ignored), so it can be passed as
    ``StateValueBaseline(value_fn=V)`` or as the critic of the proximal surrogate.
    """

    coef: jax.Array
    features: Callable = eqx.field(static=True)
    average_cost: jax.Array | None = None

    def __call__(self, x, theta=None):
        return jnp.dot(self.features(x), self.coef)


def _transition_terms(problem, theta, batch, weight_clip, weighting):
    """Ratios r, costs, absorbed mask, terminal bootstrap and state weights d, all (n, H)."""
    lr = log_ratios(problem, theta, batch)
    r = jnp.exp(lr)
    if weight_clip is not None:
        r = jnp.minimum(r, weight_clip)
    costs = step_costs(problem, theta, batch)
    ab = absorbed(problem, batch)
    if problem.terminal_cost is not None:
        horizon = batch.states.shape[1] - 1
        ts_next = jnp.arange(1, horizon + 1, dtype=jnp.result_type(float)) * problem.system.time_step
        phi_next = jax.vmap(jax.vmap(problem.final_cost, in_axes=(0, 0, None)), in_axes=(None, 0, None))(
            ts_next, batch.states[:, 1:], theta
        )
        term = jnp.where(ab, phi_next, 0.0)
    else:
        term = jnp.zeros_like(costs)
    if weighting == "uniform":
        d = jnp.ones_like(costs)
    elif weighting == "behavior":
        d = jnp.broadcast_to(batch.step_weights / batch.step_weights[0], costs.shape)
    elif weighting == "target":
        W = importance_weights(lr, weight_clip=weight_clip)[:, :-1]
        d = W * batch.step_weights / batch.step_weights[0]
    else:
        raise ProblemError(f"state_weighting must be 'behavior', 'target' or 'uniform', got {weighting!r}")
    return r, costs, ab, term, jnp.where(batch.valid, d, 0.0)


def _is_returns(costs, r, ab, term, valid, gamma):
    """Per-decision IS returns G_t = L_t + gamma r_t [(1-abs) G_{t+1} + abs Phi], 0 after the last step, (n, H)."""

    def back(G_next, inp):
        c, rr, a, tm, v = inp
        G = jnp.where(v, c + gamma * rr * jnp.where(a, tm, G_next), 0.0)
        return G, G

    _, G = jax.lax.scan(back, jnp.zeros(costs.shape[0]), (costs.T, r.T, ab.T, term.T, valid.T), reverse=True)
    return G.T


@eqx.filter_jit
def _lstd_stats(problem, theta, batch, features, gamma, lam, weight_clip, weighting, method):
    r, costs, ab, term, d = _transition_terms(problem, theta, batch, weight_clip, weighting)
    phi = jax.vmap(jax.vmap(features))(batch.states)  # (n, H+1, f)
    valid = batch.valid
    f = phi.shape[-1]
    if method == "mc":
        G = _is_returns(costs, r, ab, term, valid, gamma)
        p = phi[:, :-1] * d[..., None]
        return jnp.einsum("ntf,ntg->fg", p, phi[:, :-1]), jnp.einsum("ntf,nt->f", p, G)
    nxt = jnp.where((valid & ~ab)[..., None], phi[:, 1:], 0.0)
    diff = phi[:, :-1] - gamma * r[..., None] * nxt  # (n, H, f)
    reward = costs + gamma * r * term

    def fwd(z, inp):
        ph, dd, r_prev, v = inp
        z = jnp.where(v[:, None], dd[:, None] * ph + gamma * lam * r_prev[:, None] * z, 0.0)
        return z, z

    r_prev = jnp.concatenate([jnp.zeros((r.shape[0], 1)), jnp.where(ab, 0.0, r)[:, :-1]], axis=1)
    _, z = jax.lax.scan(fwd, jnp.zeros((costs.shape[0], f)), (phi[:, :-1].swapaxes(0, 1), d.T, r_prev.T, valid.T))
    z = z.swapaxes(0, 1)
    return jnp.einsum("ntf,ntg->fg", z, diff), jnp.einsum("ntf,nt->f", z, reward)


@eqx.filter_jit
def _differential_stats(problem, theta, batch, features, lam, weight_clip):
    """Sufficient statistics of average-cost LSTD(lam): A, sum z, b = sum z L, m = sum d phi."""
    r, costs, ab, _, _ = _transition_terms(problem, theta, batch, weight_clip, "uniform")
    w = batch.step_weights
    d = jnp.where(batch.valid, jnp.broadcast_to(w / jnp.max(w), costs.shape), 0.0)
    phi = jax.vmap(jax.vmap(features))(batch.states)  # (n, H+1, f)
    valid = batch.valid
    f = phi.shape[-1]
    nxt = jnp.where((valid & ~ab)[..., None], phi[:, 1:], 0.0)
    diff = phi[:, :-1] - r[..., None] * nxt

    def fwd(z, inp):
        ph, dd, r_prev, v = inp
        z = jnp.where(v[:, None], dd[:, None] * ph + lam * r_prev[:, None] * z, 0.0)
        return z, z

    r_prev = jnp.concatenate([jnp.zeros((r.shape[0], 1)), jnp.where(ab, 0.0, r)[:, :-1]], axis=1)
    _, z = jax.lax.scan(fwd, jnp.zeros((costs.shape[0], f)), (phi[:, :-1].swapaxes(0, 1), d.T, r_prev.T, valid.T))
    z = z.swapaxes(0, 1)
    return (
        jnp.einsum("ntf,ntg->fg", z, diff),
        jnp.einsum("ntf->f", z),
        jnp.einsum("ntf,nt->f", z, costs),
        jnp.einsum("ntf,nt->f", phi[:, :-1], d),
    )


def fit_differential_value(
    problem: Problem,
    theta: PyTree,
    data,
    features: Callable,
    *,
    lam: float = 0.0,
    ridge: float = 1e-8,
    weight_clip: float | None = None,
    episodes_per_chunk: int | None = None,
) -> LinearValue:
    r"""Average-cost LSTD(λ): fit the differential value :math:`h(x) \approx \phi(x)^\top\beta` and the average
    cost :math:`J` of the target chain jointly, in closed form (module docstring, "Average cost").

    **Arguments:** as :func:`fit_value_linear` (``lam`` must lie in ``[0, 1)``).

    **Returns:** a :class:`LinearValue` for :math:`h` (mean zero over the recorded states) with ``average_cost``
    :math:`\hat J`.

    :func:`fit_value_linear` calls it for :class:`~pydso.AverageCost` problems. When not to use it: on a chain
    that is not ergodic (several closed classes: :math:`h` and :math:`J` are not unique), or with episodes too
    short to mix (raise ``burn_in`` and ``horizon`` of the setting).
    """
    if not (isinstance(lam, int | float) and 0.0 <= lam < 1.0):
        raise ProblemError(f"lam must lie in [0, 1) for average-cost LSTD, got {lam!r}")
    A = zs = b = m = None
    for batch in iter_batches(data, problem, episodes_per_chunk):
        stats = _differential_stats(problem, theta, batch, features, float(lam), weight_clip)
        A, zs, b, m = stats if A is None else tuple(x + y for x, y in zip((A, zs, b, m), stats, strict=True))
    f = A.shape[0]
    top = jnp.concatenate([A + ridge * jnp.eye(f, dtype=A.dtype), zs[:, None]], axis=1)
    bottom = jnp.concatenate([m, jnp.zeros((1,), m.dtype)])[None, :]
    sol = jnp.linalg.solve(jnp.concatenate([top, bottom], axis=0), jnp.concatenate([b, jnp.zeros((1,), b.dtype)]))
    if not bool(jnp.all(jnp.isfinite(sol))):
        raise ProblemError(
            "average-cost LSTD is singular: the features cannot separate the recorded states, or the data visit too "
            "few states; use other features, more episodes or a larger ridge"
        )
    return LinearValue(sol[:f], features, sol[f])


def fit_value_linear(
    problem: Problem,
    theta: PyTree,
    data,
    features: Callable,
    *,
    method: str = "td",
    lam: float = 0.0,
    gamma: float | None = None,
    ridge: float = 1e-8,
    weight_clip: float | None = None,
    state_weighting: str = "behavior",
    episodes_per_chunk: int | None = None,
) -> LinearValue:
    r"""Fit :math:`V_\theta(x) \approx \phi(x)^\top\beta` of the target chain from logged data, in closed form
    (module docstring).

    **Arguments:**

    - ``problem``, ``theta``: the target chain.
    - ``data``: :class:`~pydso.estimators.LoggedBatch`, :class:`~pydso.Trajectories` or a dataset (streamed).
    - ``features``: :math:`\phi(x) \to (f,)` (e.g. ``lambda x: jax.nn.one_hot(x, S)`` for a tabular chain, which
      gives the exact values of the visited states).
    - ``method``: ``"td"`` (off-policy LSTD(``lam``)) or ``"mc"`` (weighted least squares on IS returns).
    - ``lam``: λ of LSTD(λ).
    - ``gamma``: discount (default: the problem's, :func:`discount`).
    - ``ridge``: :math:`\beta = (A + \text{ridge}\,I)^{-1} b`.
    - ``weight_clip``: truncation of the ratios.
    - ``state_weighting``: ``"behavior"`` (:math:`d_t = w_t/w_0`, the behaviour's discounted occupancy: low
      variance, and late truncated returns get little weight), ``"uniform"`` (:math:`d_t = 1`) or ``"target"``
      (:math:`d_t = W_t w_t/w_0`, the target's discounted occupancy :math:`\rho_\theta`).
    - ``episodes_per_chunk``: chunk size when streaming a dataset (the sufficient statistics :math:`A, b` are
      accumulated chunk by chunk).

    **Returns:** a :class:`LinearValue`.

    For an :class:`~pydso.AverageCost` problem without ``gamma`` the differential value and the average cost are
    fitted (:func:`fit_differential_value`; ``method="td"`` only, ``state_weighting`` does not apply).
    """
    if method not in ("td", "mc"):
        raise ProblemError(f"method must be 'td' or 'mc', got {method!r}")
    if gamma is None and isinstance(problem.setting, AverageCost):
        if method != "td":
            raise ProblemError(
                "method='mc' needs a discount; for the AverageCost setting use method='td' (average-cost LSTD) "
                "or pass gamma=..."
            )
        return fit_differential_value(
            problem,
            theta,
            data,
            features,
            lam=lam,
            ridge=ridge,
            weight_clip=weight_clip,
            episodes_per_chunk=episodes_per_chunk,
        )
    g = discount(problem, gamma)
    A = b = None
    for batch in iter_batches(data, problem, episodes_per_chunk):
        a_, b_ = _lstd_stats(problem, theta, batch, features, g, float(lam), weight_clip, state_weighting, method)
        A, b = (a_, b_) if A is None else (A + a_, b + b_)
    coef = jnp.linalg.solve(A + ridge * jnp.eye(A.shape[0], dtype=A.dtype), b)
    return LinearValue(coef, features)


@eqx.filter_jit
def _fit_network(params, static, optimizer, batch_arrays, key, gamma, method, epochs, minibatch, target_update):
    x, xn, r, costs, ab, term, valid, G = batch_arrays
    n = x.shape[0]
    nb = n // minibatch

    def loss(p, target, idx):
        net = eqx.combine(p, static)
        v = jax.vmap(jax.vmap(net))(x[idx])
        if method == "mc":
            y = G[idx]
        else:
            v_next = jax.vmap(jax.vmap(eqx.combine(target, static)))(xn[idx])
            y = costs[idx] + gamma * r[idx] * jnp.where(ab[idx], term[idx], v_next)
        m = valid[idx]
        err = jnp.where(m, v - jax.lax.stop_gradient(y), 0.0)
        return jnp.sum(err**2) / jnp.maximum(jnp.sum(m, dtype=err.dtype), 1.0)

    def update(carry, idx):
        p, target, st, count = carry
        target = jax.tree.map(lambda a, b: jnp.where(count % target_update == 0, a, b), p, target)
        g = jax.grad(loss)(p, target, idx)
        upd, st = optimizer.update(g, st, p)
        return (optax.apply_updates(p, upd), target, st, count + 1), None

    def epoch(carry, k):
        perm = jax.random.permutation(k, n)[: nb * minibatch].reshape(nb, minibatch)
        return jax.lax.scan(update, carry, perm)[0], None

    carry = (params, params, optimizer.init(params), jnp.asarray(0))
    (params, _, _, _), _ = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
    return params


def fit_value_network(
    model: eqx.Module,
    problem: Problem,
    theta: PyTree,
    data,
    *,
    key: jax.Array,
    method: str = "mc",
    gamma: float | None = None,
    epochs: int = 20,
    minibatch: int = 32,
    optimizer: optax.GradientTransformation | None = None,
    weight_clip: float | None = None,
    target_update: int = 50,
) -> eqx.Module:
    r"""Fit an equinox network ``model(x) -> scalar`` to :math:`V_\theta` from in-memory logged data with optax.

    **Arguments:**

    - ``model``: the initial network (its inexact arrays are trained).
    - ``problem``, ``theta``: the target chain.
    - ``data``: :class:`~pydso.estimators.LoggedBatch`, :class:`~pydso.Trajectories` or a dataset (read whole).
    - ``key``: shuffles the episodes every epoch.
    - ``method``: ``"mc"``: regression on per-decision IS returns :math:`G_t`; ``"td"``: importance-weighted
      semi-gradient TD(0), loss :math:`\sum_t (V(x_t) - [L_t + \gamma r_t \bar V(x_{t+1})])^2` with a target network
      :math:`\bar V` refreshed every ``target_update`` updates (Mnih et al. 2015).
    - ``gamma``: discount (default: the problem's).
    - ``epochs``: passes over the data.
    - ``minibatch``: episodes per update (all their recorded transitions; a remainder smaller than ``minibatch``
      is dropped each epoch).
    - ``optimizer``: optax transformation (default ``adam(1e-3)``).
    - ``weight_clip``: truncation of the ratios :math:`r_t`.

    **Returns:** the fitted network. The whole fit is one compiled loop.
    """
    key = check_key(key)
    epochs = check_positive_int(epochs, "epochs")
    minibatch = check_positive_int(minibatch, "minibatch")
    target_update = check_positive_int(target_update, "target_update")
    if method not in ("mc", "td"):
        raise ProblemError(f"method must be 'mc' or 'td', got {method!r}")
    g = discount(problem, gamma)
    batch: LoggedBatch = as_batch(data, problem)
    r, costs, ab, term, _ = _transition_terms(problem, theta, batch, weight_clip, "behavior")
    G = _is_returns(costs, r, ab, term, batch.valid, g)
    arrays = (batch.states[:, :-1], batch.states[:, 1:], r, costs, ab, term, batch.valid, G)
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer
    params, static = eqx.partition(model, eqx.is_inexact_array)
    minibatch = min(minibatch, batch.n_episodes)
    params = _fit_network(params, static, optimizer, arrays, key, g, method, epochs, minibatch, target_update)
    return eqx.combine(params, static)
