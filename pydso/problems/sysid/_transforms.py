"""Parameter transforms and the parameter space: the maps between physical parameters (any pytree with float
array leaves) and the flat unconstrained vector the solvers work on.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import SysIdError

BOUND_EPS = 1e-6
"""Relative distance from a bound at which a starting value exactly on the bound of a bounded transform is placed."""


def transform_pair(spec, name):
    """``(to_physical, to_unconstrained)`` of the transform ``spec`` (``None``/``'identity'``, ``'positive'``,
    ``'softplus'`` or ``(lower, upper)``) of the parameter called ``name`` (named in errors)."""
    return _transform_pair(spec, name)


def check_finite_guess(value, name: str) -> None:
    """Raise :class:`SysIdError` naming ``name`` if the starting guess ``value`` has a NaN or infinite entry."""
    a = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(a)):
        raise SysIdError(
            f"initial guess of {name!r} is not finite ({float(np.ravel(a)[~np.isfinite(np.ravel(a))][0])}): give a "
            "finite starting value (params=..., x0=... or the model's guesses)"
        )


def _transform_pair(spec, name):
    """(to_physical, to_unconstrained) for one transform spec."""
    if spec is None or spec == "identity":
        return (lambda z: z), (lambda p: p)
    if spec in ("positive", "log", "exp"):

        def inv(p):
            if np.any(np.asarray(p) <= 0):
                raise SysIdError(f"parameter {name!r} has a positive transform but initial guess {p!r} <= 0")
            return jnp.log(p)

        return jnp.exp, inv
    if spec == "softplus":

        def inv(p):
            if np.any(np.asarray(p) <= 0):
                raise SysIdError(f"parameter {name!r} has a softplus transform but initial guess {p!r} <= 0")
            return p + jnp.log(-jnp.expm1(-p))

        return jax.nn.softplus, inv
    if isinstance(spec, tuple | list) and len(spec) in (2, 3):
        lo, hi = (spec[1], spec[2]) if len(spec) == 3 else spec
        if len(spec) == 3 and spec[0] not in ("bounded", "sigmoid"):
            raise SysIdError(f"unknown transform {spec!r} for parameter {name!r}")
        lo, hi = float(lo), float(hi)
        if not hi > lo:
            raise SysIdError(f"bounded transform of {name!r} needs lower < upper, got {lo}, {hi}")

        def inv(p):
            pa = np.asarray(p)
            if np.any(pa < lo) or np.any(pa > hi):
                raise SysIdError(f"initial guess of {name!r} = {p!r} lies outside its bounds ({lo}, {hi})")
            # a value exactly on a bound (a fit's own output: the sigmoid saturates in floating point) is moved
            # just inside, so that warm starts and polishing accept any result of a fit
            q = jnp.clip((p - lo) / (hi - lo), BOUND_EPS, 1.0 - BOUND_EPS)
            return jnp.log(q) - jnp.log1p(-q)

        return (lambda z: lo + (hi - lo) * jax.nn.sigmoid(z)), inv
    raise SysIdError(
        f"unknown transform {spec!r} for parameter {name!r}: use None, 'positive', 'softplus' or (lower, upper)"
    )


def _path_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts) or "theta"


class ParamSpace:
    """Flattens the parameter pytree (float array leaves) into an unconstrained vector and back.

    Immutable, and compared and hashed by value (structure, shapes, transforms and the non-array parts of the
    pytree), so that problems with equal parameter spaces share compiled code. The initial unconstrained vector
    is :attr:`z0` (not part of the comparison).
    """

    def __init__(self, params, transforms):
        params = jax.tree.map(
            lambda v: jnp.asarray(v, dtype=float) if isinstance(v, int | float | np.ndarray | np.number) else v,
            params,
        )
        dyn, static = eqx.partition(params, eqx.is_inexact_array)
        self.static_leaves, self.static_treedef = jax.tree_util.tree_flatten(static)
        self.static_leaves = tuple(self.static_leaves)
        leaves_p, self.treedef = jax.tree_util.tree_flatten_with_path(dyn)
        transforms = dict(transforms or {})
        self.leaf_names = tuple(_path_name(p) for p, _ in leaves_p)
        unknown = set(transforms) - set(self.leaf_names)
        if unknown:
            raise SysIdError(f"transforms given for unknown parameters {sorted(unknown)}; have {list(self.leaf_names)}")
        self.shapes = tuple(tuple(v.shape) for _, v in leaves_p)
        self.sizes = tuple(int(np.prod(s)) for s in self.shapes)
        self.specs = tuple(_hashable_spec(transforms.get(n)) for n in self.leaf_names)
        z_leaves = []
        for (_, v), n, spec in zip(leaves_p, self.leaf_names, self.specs, strict=True):
            check_finite_guess(v, n)
            _, to_unc = _transform_pair(spec, n)
            z_leaves.append(jnp.ravel(to_unc(v)))
        self.size = sum(self.sizes)
        self.z0 = jnp.concatenate(z_leaves) if z_leaves else jnp.zeros((0,))
        names = []
        for n, s, shape in zip(self.leaf_names, self.sizes, self.shapes, strict=True):
            names += [n] if shape == () else [f"{n}[{i}]" for i in range(s)]
        self.names = tuple(names)
        self._key = (
            self.treedef,
            self.shapes,
            self.specs,
            self.static_treedef,
            tuple(map(_by_value_or_id, self.static_leaves)),
        )

    def __eq__(self, other):
        return isinstance(other, ParamSpace) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def physical_flat(self, z):
        """The physical values of all scalar parameters (transforms applied) from the unconstrained ``z``."""
        out, i = [], 0
        for spec, n, s in zip(self.specs, self.leaf_names, self.sizes, strict=True):
            to_phys, _ = _transform_pair(spec, n)
            out.append(to_phys(z[i : i + s]))
            i += s
        return jnp.concatenate(out) if out else z

    def unflatten(self, z):
        """The physical parameter pytree from the unconstrained vector ``z``."""
        flat = self.physical_flat(z)
        leaves, i = [], 0
        for s, shape in zip(self.sizes, self.shapes, strict=True):
            leaves.append(flat[i : i + s].reshape(shape))
            i += s
        dyn = jax.tree_util.tree_unflatten(self.treedef, leaves)
        static = jax.tree_util.tree_unflatten(self.static_treedef, list(self.static_leaves))
        return eqx.combine(dyn, static)

    def jac_diag(self, z):
        """d physical / d z (the transforms act elementwise)."""
        return jax.jvp(self.physical_flat, (z,), (jnp.ones_like(z),))[1]


def _hashable_spec(spec):
    return tuple(spec) if isinstance(spec, list) else spec


class _ById:
    """Wraps an unhashable static leaf so that it compares by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _ById) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _by_value_or_id(leaf):
    try:
        hash(leaf)
    except TypeError:
        return _ById(leaf)
    return leaf
