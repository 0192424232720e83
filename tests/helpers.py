"""Reusable test helpers: tolerance-aware pytree comparison and random tabular problems."""

import jax
import jax.numpy as jnp
import numpy as np

import pydso


def assert_tree_allclose(a, b, rtol=1e-7, atol=0.0):
    """Assert ``|a - b| <= atol + rtol * |b|`` leafwise for two pytrees of the same structure.

    On failure the message names the path of the worst leaf (largest ratio of error to tolerance), its
    maximal absolute and relative errors, and the index of the worst entry.
    """
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    if tree_a != tree_b:
        raise AssertionError(f"pytree structures differ:\n  {tree_a}\n  {tree_b}")
    worst = None
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path) or "<root>"
        if x.shape != y.shape:
            raise AssertionError(f"leaf {name}: shapes differ, {x.shape} vs {y.shape}")
        if x.size == 0:
            continue
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            if not np.array_equal(x, y, equal_nan=True):
                raise AssertionError(f"leaf {name}: non-finite values differ")
            continue
        err = np.abs(x - y)
        tol = atol + rtol * np.abs(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        r = float(ratio[idx])
        if worst is None or r > worst[0]:
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.max(np.where(np.abs(y) > 0, err / np.abs(y), np.where(err > 0, np.inf, 0.0)))
            worst = (r, name, float(err.max()), float(rel), idx, x[idx], y[idx])
    if worst is not None and worst[0] > 1.0:
        r, name, abs_err, rel_err, idx, xv, yv = worst
        raise AssertionError(
            f"pytrees differ (rtol={rtol}, atol={atol}); worst leaf {name}: max abs err {abs_err:.3e}, "
            f"max rel err {rel_err:.3e}, worst entry {tuple(int(i) for i in idx)}: {xv!r} vs {yv!r} "
            f"({r:.3g} x tolerance)"
        )


def random_tabular_problem(key_or_seed, S, gamma=0.9, average=False, horizon=None):
    """A random ``S``-state :class:`pydso.TabularChain` problem and a random parameter pytree.

    ``theta = {"logits": (S*S,), "cost": (S,)}``; ``P = softmax(logits.reshape(S, S), axis=1)`` (all entries
    positive, so the chain is ergodic); the step cost depends on both leaves, non-linearly:
    ``L(x) = c0[x] + sin(cost[x]) + 0.1 * sum(cost**2) / S + 0.1 * sum_x' P(x'|x) log P(x'|x)`` (a negative
    entropy term, as in entropy-regularised control). The setting is ``Episodic(gamma)`` or, with
    ``average=True``, ``AverageCost()``, with ``horizon`` steps if given; the initial distribution is a random
    Dirichlet draw.
    Returns ``(problem, theta)``.
    """
    key = jax.random.key(key_or_seed) if isinstance(key_or_seed, int | np.integer) else key_or_seed
    k_logits, k_cost, k_c0, k_p0 = jax.random.split(key, 4)
    c0 = jax.random.uniform(k_c0, (S,), minval=-1.0, maxval=2.0)
    p0 = jax.random.dirichlet(k_p0, jnp.ones(S))
    p0 = p0 / jnp.sum(p0)

    def transition_fn(theta):
        return jax.nn.softmax(theta["logits"].reshape(S, S), axis=1)

    def cost(x, theta):
        logp = jax.nn.log_softmax(theta["logits"].reshape(S, S)[x])
        neg_entropy = jnp.sum(jnp.exp(logp) * logp)
        w = theta["cost"]
        return c0[x] + jnp.sin(w[x]) + 0.1 * jnp.sum(w**2) / S + 0.1 * neg_entropy

    kwargs = {} if horizon is None else {"horizon": horizon}
    setting = pydso.AverageCost(**kwargs) if average else pydso.Episodic(gamma=gamma, **kwargs)
    kind = "average" if average else f"gamma{gamma}"
    problem = pydso.Problem(
        pydso.TabularChain(transition_fn),
        cost,
        setting,
        pydso.Categorical(p0),
        name=f"random_tabular_S{S}_{kind}",
    )
    theta = {
        "logits": jax.random.normal(k_logits, (S * S,)),
        "cost": 0.5 * jax.random.normal(k_cost, (S,)),
    }
    return problem, theta
