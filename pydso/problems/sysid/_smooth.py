r"""Smooth (differentiable) versions of the hard nonlinearities of real plants, for grey-box models fitted by
Gauss–Newton-type methods: saturation, dead zones, overflows.

A hard ``max`` has a kink where a Jacobian-based solver loses its gradient (a saturated sensor gives a zero column);
these replacements are :math:`C^\infty` with a ``sharpness`` :math:`k` (in 1 / units of the argument):

* :func:`smooth_max` :math:`(a, b) \mapsto b + \operatorname{softplus}(k(a - b))/k`, within :math:`\log 2 / k` above
  :math:`\max(a, b)` (the error is largest where :math:`a = b`, and vanishes away from it);
* :func:`smooth_min`, :func:`smooth_abs` (:math:`\ge |x|`), :func:`smooth_clip` (saturation to ``[lower, upper]``),
  :func:`dead_zone` (:math:`x - \operatorname{clip}(x, -w, w)`: zero inside the zone, :math:`x \mp w` outside) and
  :func:`overflow` (:math:`\max(x - \ell, 0)`: what exceeds a level, e.g. a tank spilling over).

Every helper tends to its hard version as :math:`k \to \infty` (uniformly, with error :math:`O(1/k)`) and is a
plain JAX function (traceable, differentiable, broadcasting). ``sharpness`` may be a fitted parameter (with a
positive transform). When not to use them: where the hard nonlinearity is known exactly and the solver never
needs a gradient across the kink (e.g. a simulation only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["smooth_max", "smooth_min", "smooth_abs", "smooth_clip", "dead_zone", "overflow"]


def smooth_max(a, b, sharpness):
    r"""Smooth :math:`\max(a, b)`: :math:`b + \operatorname{softplus}(k(a - b))/k`, in
    :math:`[\max(a,b), \max(a,b) + \log 2/k]`.

    **Arguments:** ``a``, ``b`` (arrays, broadcast), ``sharpness`` :math:`k > 0` (1 / units of ``a``).

    **Returns:** an array of the broadcast shape.
    """
    k = jnp.asarray(sharpness)
    return b + jax.nn.softplus(k * (a - b)) / k


def smooth_min(a, b, sharpness):
    r"""Smooth :math:`\min(a, b) = -\max(-a, -b)`, in :math:`[\min(a,b) - \log 2/k, \min(a,b)]`."""
    return -smooth_max(-a, -b, sharpness)


def smooth_abs(x, sharpness):
    r"""Smooth :math:`|x| = \max(x, -x)`, in :math:`[|x|, |x| + \log 2/k]`."""
    return smooth_max(x, -x, sharpness)


def smooth_clip(x, lower, upper, sharpness):
    r"""Smooth saturation :math:`\operatorname{clip}(x, \ell, u) = \min(\max(x, \ell), u)` (``lower < upper``),
    within :math:`\log 2/k` of it.

    **Arguments:** ``x``, ``lower``, ``upper`` (broadcast), ``sharpness`` :math:`k > 0`.
    """
    return smooth_min(smooth_max(x, lower, sharpness), upper, sharpness)


def dead_zone(x, width, sharpness):
    r"""Smooth dead zone :math:`x - \operatorname{clip}(x, -w, w)`: about 0 for :math:`|x| < w`,
    :math:`x - w` above and :math:`x + w` below (``width`` :math:`w \ge 0`), within :math:`\log 2/k`."""
    return x - smooth_clip(x, -width, width, sharpness)


def overflow(x, level, sharpness):
    r"""Smooth overflow :math:`\max(x - \ell, 0)`: the part of ``x`` above ``level`` (e.g. the level of a tank
    above its rim), within :math:`\log 2/k`."""
    return smooth_max(x - level, jnp.zeros_like(x - level), sharpness)
