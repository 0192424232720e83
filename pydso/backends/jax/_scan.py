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

__all__ = ["checkpointed_scan"]


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
