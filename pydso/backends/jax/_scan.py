r"""One checkpointed ``lax.scan`` for every rollout of the JAX backend (chains and the fixed-step fast path).

Reverse mode through ``lax.scan`` stores the residuals of every iteration: memory :math:`O(H)` for a horizon of
:math:`H` iterations. Splitting the scan into :math:`k` segments, each wrapped in :func:`jax.checkpoint`, stores
only the :math:`k` segment-boundary carries plus the residuals of the one segment being differentiated, at the price
of one extra forward pass: memory :math:`O(k + H/k)`, minimal at :math:`k \approx \sqrt H` (Griewank & Walther,
*Evaluating Derivatives*, 2nd ed., SIAM 2008, ch. 12). The results, values and gradients, are those of the plain
scan.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..._errors import ProblemError
from ..._typing import PyTree

__all__ = ["checkpointed_scan", "episode_major_scan"]

# Intervals per block of episode_major_scan: (16, d, N) float64 is 3.8 MB for d = 3, N = 1e4 (stays in cache).
EPISODE_BLOCK = 16


def checkpointed_scan(
    f: Callable, init: PyTree, xs: PyTree | None = None, length: int | None = None, *, checkpoints: int | None = None
) -> tuple[PyTree, PyTree]:
    r"""``jax.lax.scan(f, init, xs, length)``, optionally as ``checkpoints`` rematerialised segments.

    With ``checkpoints = k > 1`` (and more than one iteration), an outer scan runs over ``k`` segments of
    ``m = length // k`` iterations, each segment a :func:`jax.checkpoint`-ed inner scan, followed by one checkpointed
    remainder segment of ``length - k m`` iterations when ``k`` does not divide ``length`` (``k`` is capped at
    ``length``). Reverse mode then stores ``k`` carries and one segment's residuals at a time.

    **Arguments:**

    - `f`: ``f(carry, x) -> (carry, y)`` as for :func:`jax.lax.scan`.
    - `init`: the initial carry.
    - `xs`: per-iteration inputs with leading axis ``length`` (a pytree), or None.
    - `length`: the number of iterations; required when ``xs`` is None.
    - `checkpoints`: the number of segments ``k``; None, 0 or 1 give the plain scan.

    **Returns:**

    ``(carry, ys)`` exactly as :func:`jax.lax.scan` (``ys`` stacked along a leading axis of size ``length``).

    Do not use it for short scans whose residuals fit in memory: the extra forward pass only costs time there.
    """
    leaves = jax.tree.leaves(xs)
    if length is None:
        if not leaves:
            raise ProblemError("checkpointed_scan needs xs or length")
        length = leaves[0].shape[0]
    length = int(length)
    if not checkpoints or checkpoints <= 1 or length <= 1:
        return jax.lax.scan(f, init, xs, length=length)
    k = min(int(checkpoints), length)
    m, rem = divmod(length, k)

    @jax.checkpoint
    def segment(c, xs_seg):
        return jax.lax.scan(f, c, xs_seg, length=m)

    head = None if xs is None else jax.tree.map(lambda a: a[: k * m].reshape((k, m) + a.shape[1:]), xs)
    carry, ys = jax.lax.scan(segment, init, head, length=k)
    ys = jax.tree.map(lambda y: y.reshape((k * m,) + y.shape[2:]), ys)
    if rem:
        tail = None if xs is None else jax.tree.map(lambda a: a[k * m :], xs)
        carry, ys_rem = jax.checkpoint(lambda c, t: jax.lax.scan(f, c, t, length=rem))(carry, tail)
        ys = jax.tree.map(lambda a, r: jnp.concatenate([a, r]), ys, ys_rem)
    return carry, ys


def episode_major_scan(
    f: Callable, init: PyTree, xs: PyTree | None, length: int, *, first: jax.Array, block: int = EPISODE_BLOCK
) -> tuple[PyTree, jax.Array, PyTree]:
    r"""``jax.lax.scan(f, init, xs, length)`` for struct-of-arrays outputs, written episode-major in blocks.

    ``f(carry, x) -> (carry, (state, extras))`` returns the ensemble's state in struct-of-arrays layout, shape
    ``(d, N)`` (episodes last), and ``extras``, a pytree of per-episode vectors of shape ``(N,)`` (step costs,
    log-densities; may be None). A plain scan stacks them time-major, ``(length, d, N)``, and the ``(N, length, d)``
    layout users index (``states[i]`` is episode ``i``) then needs a transpose: a second pass over the whole output,
    writing it again. Here ``block`` iterations at a time run as an inner scan whose ``(block, d, N)`` output stays
    in cache, are transposed there, and are written with one ``dynamic_update_slice`` into the episode-major result:
    each episode's rows of that block are one contiguous run of ``block * d`` numbers. The result is written once.

    **Arguments:**

    - `f`, `init`, `xs`, `length`: as for :func:`jax.lax.scan` (``xs`` a pytree with leading axis ``length``, or
      None).
    - `first`: ``(N, d)``, the states before the first iteration (row 0 of the result).
    - `block`: iterations per block.

    **Returns:**

    ``(carry, states, extras)`` with ``states`` of shape ``(N, length + 1, d)`` (``first`` then one row per
    iteration) and each leaf of ``extras`` of shape ``(N, length)``.

    Not for reverse mode with segment checkpoints (:func:`checkpointed_scan`): a checkpointed segment would save
    the carried result at each boundary. Differentiating it plainly is fine (the result's buffer is linear in the
    outputs and is not a residual).
    """
    length = int(length)
    N, d = first.shape
    k = max(1, min(int(block), length))
    n_blocks, rem = divmod(length, k)

    def run(carry, x_block, m):
        carry, (xs_b, ex_b) = jax.lax.scan(f, carry, x_block, length=m)
        return carry, jnp.transpose(xs_b, (2, 0, 1)), jax.tree.map(lambda e: e.T, ex_b)

    _, (x_spec, ex_spec) = jax.eval_shape(f, init, jax.tree.map(lambda a: a[0], xs))
    states = jnp.zeros((N, length + 1, d), x_spec.dtype).at[:, 0].set(first.astype(x_spec.dtype))
    extras = jax.tree.map(lambda e: jnp.zeros((N, length), e.dtype), ex_spec)

    def outer(state, x_block):
        carry, states, extras, b = state
        carry, xb, eb = run(carry, x_block, k)
        zero, start = jnp.zeros((), jnp.int32), b * k  # int32 indices (b is an int32 counter)
        states = jax.lax.dynamic_update_slice(states, xb, (zero, start + 1, zero))
        extras = jax.tree.map(lambda E, e: jax.lax.dynamic_update_slice(E, e, (zero, start)), extras, eb)
        return (carry, states, extras, b + 1), None

    head = None if xs is None else jax.tree.map(lambda a: a[: n_blocks * k].reshape((n_blocks, k) + a.shape[1:]), xs)
    (carry, states, extras, _), _ = jax.lax.scan(
        outer, (init, states, extras, jnp.asarray(0, jnp.int32)), head, length=n_blocks
    )
    if rem:
        tail = None if xs is None else jax.tree.map(lambda a: a[n_blocks * k :], xs)
        carry, xb, eb = run(carry, tail, rem)
        states = states.at[:, 1 + n_blocks * k :].set(xb)
        extras = jax.tree.map(lambda E, e: E.at[:, n_blocks * k :].set(e), extras, eb)
    return carry, states, extras
