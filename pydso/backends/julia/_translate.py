r"""Translate a problem's JAX functions into Julia source: jaxpr in, straight-line Julia out.

A function ``fn(t, x, theta)`` is traced with :func:`jax.make_jaxpr` on the problem's state shape and ``theta``; each
equation of the jaxpr becomes one assignment of a Julia function that takes ``(t, x, theta)`` with ``theta`` the
flat parameter vector. ``pjit``/``jit``, ``closed_call`` and ``custom_jvp_call``/``custom_vjp_call`` sub-jaxprs are
inlined. The first primitive outside the supported subset raises :class:`~pydso.ProblemError` naming it.

**Layout.** A JAX array of shape :math:`(s_1,\dots,s_r)` (row-major) is represented in Julia by the array of size
:math:`(s_r,\dots,s_1)` (column-major) with the *same memory*: no copy, no transposition. Rank-0 arrays are Julia
numbers. A JAX axis :math:`a` (0-based) of a rank-:math:`r` array is Julia dimension :math:`r-a` (1-based). Under this
convention ``reshape`` is Julia's ``reshape`` of the reversed sizes, and ``dot_general`` (no batch dimensions) is
:math:`\mathrm{tensordot}(\text{rhs}, \text{lhs})` over the mapped dimensions (numpy's ``tensordot`` convention: free
dimensions of the first argument, then of the second) — ``W @ x`` becomes ``PyDSO.tensordot(x, W, (1,), (1,))``,
i.e. ``transpose(Wj) * x`` for the Julia matrix ``Wj`` of size ``(in, out)``.

**Parameters.** ``theta`` reaches Julia as the flat vector ``jax.flatten_util.ravel_pytree(theta)[0]`` (leaves in
``jax.tree_util`` order, each raveled row-major). Leaf :math:`k` with JAX shape :math:`s` and offset :math:`o_k`
occupies ``theta[o_k+1 : o_k+prod(s)]`` and is read by ``PyDSO.leaf(theta, o_k, reverse(s))`` (a reshaped view, an
``SArray`` for static ``theta``). The layout is written into the header of the emitted source and returned by
:func:`theta_layout`.

**Supported primitives** (:data:`SUPPORTED_PRIMITIVES`): ``add sub mul div neg pow integer_pow square exp log
expm1 log1p sin cos tan tanh logistic sqrt rsqrt abs sign max min rem atan2 clamp``, the comparisons ``lt le gt ge
eq ne``, ``and or not``, ``select_n``, ``dot_general`` (no batch dimensions: matrix products and dots),
``broadcast_in_dim reshape squeeze expand_dims transpose concatenate stack slice reduce_sum reduce_max reduce_min``,
``convert_element_type`` (to floating point or bool), ``copy``, and the call primitives above. Not supported (by
design: they have no straight-line Julia equivalent here): loops and conditionals (``while``, ``scan``, ``cond``),
traced indexing (``gather``, ``dynamic_slice``, ``scatter``), random numbers, sorting. Use static indices
(``x[0]``, ``x[1:3]``), ``jnp.where`` instead of ``lax.cond``, or supply Julia source (:class:`JuliaModel`).
"""

import itertools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ..._errors import ProblemError
from ..._typing import PyTree
from ...systems import ODESystem, Problem, SDESystem

__all__ = [
    "SUPPORTED_PRIMITIVES",
    "ThetaLeaf",
    "JuliaModel",
    "theta_layout",
    "translate_function",
    "translate_problem",
]

_UNARY = {
    "neg": ".-{0}",
    "exp": "exp.({0})",
    "log": "log.({0})",
    "expm1": "expm1.({0})",
    "log1p": "log1p.({0})",
    "sin": "sin.({0})",
    "cos": "cos.({0})",
    "tan": "tan.({0})",
    "tanh": "tanh.({0})",
    "logistic": "PyDSO.logistic.({0})",
    "sqrt": "sqrt.({0})",
    "rsqrt": "PyDSO.rsqrt.({0})",
    "abs": "abs.({0})",
    "sign": "sign.({0})",
    "square": "{0} .^ 2",
    "not": ".!{0}",
}
_BINARY = {
    "add": "{0} .+ {1}",
    "sub": "{0} .- {1}",
    "mul": "{0} .* {1}",
    "div": "{0} ./ {1}",
    "pow": "{0} .^ {1}",
    "max": "max.({0}, {1})",
    "min": "min.({0}, {1})",
    "rem": "rem.({0}, {1})",
    "atan2": "atan.({0}, {1})",
    "lt": "{0} .< {1}",
    "le": "{0} .<= {1}",
    "gt": "{0} .> {1}",
    "ge": "{0} .>= {1}",
    "eq": "{0} .== {1}",
    "ne": "{0} .!= {1}",
    "and": "{0} .& {1}",
    "or": "{0} .| {1}",
}
_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint")
_ALIASES = ("copy", "copy_p", "optimization_barrier")
_STRUCTURAL = (
    "select_n",
    "clamp",
    "integer_pow",
    "dot_general",
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "transpose",
    "concatenate",
    "stack",
    "slice",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "convert_element_type",
)
SUPPORTED_PRIMITIVES: tuple[str, ...] = tuple(sorted({*_UNARY, *_BINARY, *_CALLS, *_ALIASES, *_STRUCTURAL}))
"""Names of the JAX primitives the translator turns into Julia (the documented subset)."""


class ThetaLeaf(NamedTuple):
    """Where one leaf of ``theta`` sits in the flat parameter vector Julia receives."""

    path: str
    """``jax.tree_util.keystr`` of the leaf (e.g. ``"['sigma']"``, ``".layers[0].weight"``)."""
    offset: int
    """0-based offset of the leaf's first entry in the flat vector."""
    shape: tuple[int, ...]
    """The leaf's JAX shape (its Julia size is the reverse)."""


def theta_layout(theta: PyTree) -> tuple[ThetaLeaf, ...]:
    """The flat-vector layout of ``theta`` used by the Julia backend: the order and offsets of
    ``jax.flatten_util.ravel_pytree(theta)[0]``.

    **Arguments:**

    - `theta`: the parameter pytree (array leaves).

    **Returns:**

    One :class:`ThetaLeaf` per leaf, in ``jax.tree_util`` order.
    """
    leaves = jax.tree_util.tree_flatten_with_path(theta)[0]
    out, offset = [], 0
    for path, leaf in leaves:
        shape = tuple(int(s) for s in np.shape(leaf))
        out.append(ThetaLeaf(jax.tree_util.keystr(path), offset, shape))
        offset += int(np.prod(shape, dtype=np.int64))
    return tuple(out)


class JuliaModel(eqx.Module):
    r"""Julia source for a problem's right-hand side and running cost, and the names of its functions.

    Every function has the signature ``f(t, x, theta)`` in the layout of this module's docstring (``x`` a vector of
    the state, ``theta`` the flat parameter vector): ``vector_field`` returns :math:`\dot x` (the drift for SDEs),
    ``running_cost`` the scalar :math:`L`, ``diffusion`` (SDEs only) the diagonal noise scale, a number or a vector.

    Built by :func:`translate_problem`, or by hand to supply Julia code directly (the alternative to translation,
    e.g. for a model with loops or calls into Julia libraries)::

        source = (
            "lorenz(t, x, p) = SVector(p[3] * (x[2] - x[1]), x[1] * (p[2] - x[3]) - x[2], x[1] * x[2] - p[1] * x[3])\n"
            "cost(t, x, p) = x[1]^2\n"
        )  # theta = {"beta": ..., "rho": ..., "sigma": ...}: ravel_pytree sorts dict keys
        JuliaModel(kind="ode", source=source, vector_field="lorenz", running_cost="cost")

    The source is evaluated in a fresh module that has ``using PyDSO, StaticArrays, LinearAlgebra``. Hand-written
    source must follow the same ``theta`` layout as :func:`theta_layout` (the flat ``ravel_pytree`` vector).
    """

    kind: str = eqx.field(static=True)
    source: str = eqx.field(static=True)
    vector_field: str = eqx.field(static=True)
    running_cost: str = eqx.field(static=True)
    diffusion: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.kind not in ("ode", "sde"):
            raise ProblemError(f"JuliaModel.kind must be 'ode' or 'sde', got {self.kind!r}")
        if (self.kind == "sde") != (self.diffusion is not None):
            raise ProblemError("JuliaModel.diffusion must name a Julia function for kind='sde' and be None for 'ode'")
        for field in ("source", "vector_field", "running_cost"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field).strip():
                raise ProblemError(f"JuliaModel.{field} must be a non-empty string")


# ------------------------------------------------------------------------------------------------ emission
def _jdims(shape: Sequence[int]) -> str:
    """A Julia tuple literal of the reversed shape (the Julia size of a JAX shape)."""
    return _tuple(tuple(reversed(tuple(int(s) for s in shape))))


def _tuple(values: Sequence) -> str:
    values = tuple(values)
    if len(values) == 1:
        return f"({values[0]},)"
    return "(" + ", ".join(str(v) for v in values) + ")"


def _float_literal(value: float, dtype) -> str:
    v = float(value)
    if np.isnan(v):
        text = "NaN"
    elif np.isinf(v):
        text = "Inf" if v > 0 else "(-Inf)"
    else:
        text = repr(v)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        if v < 0:
            text = f"({text})"
    if np.dtype(dtype) == np.float32:
        return f"Float32({text})"
    if np.dtype(dtype) == np.float64:
        return text
    raise ProblemError(f"the Julia translator supports float32/float64 values, got a constant of dtype {dtype}")


def _scalar_literal(value, dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "true" if bool(value) else "false"
    if np.issubdtype(dtype, np.integer):
        v = int(value)
        return f"({v})" if v < 0 else str(v)
    return _float_literal(value, dtype)


class _Line(NamedTuple):
    out: str
    expr: str
    inputs: tuple[str, ...]
    comment: str = ""


class _Emitter:
    """Walks a jaxpr and collects one Julia assignment per equation (then drops the unused ones)."""

    def __init__(self, what: str):
        self.what = what
        self.lines: list[_Line] = []
        self.counter = itertools.count(1)
        self.single_index: dict[str, tuple[str, int]] = {}
        self.seen: dict[str, str] = {}

    def fresh(self, prefix: str = "v") -> str:
        return f"{prefix}{next(self.counter)}"

    def emit(self, expr: str, inputs: Sequence[str], comment: str = "", prefix: str = "v") -> str:
        if expr in self.seen:  # every expression is pure: the same text over the same names is the same value
            return self.seen[expr]
        out = self.fresh(prefix)
        self.lines.append(_Line(out, expr, tuple(i for i in inputs if i is not None), comment))
        self.seen[expr] = out
        return out

    # -- atoms
    def constant(self, value) -> tuple[str, str | None]:
        """Julia text of a constant and the name it is bound to (None for inline scalars)."""
        a = np.asarray(value)
        if a.ndim == 0:
            return _scalar_literal(a, a.dtype), None
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)):
            raise ProblemError(f"the Julia translator cannot embed a constant of dtype {a.dtype} in {self.what}")
        values = ", ".join(_scalar_literal(v, a.dtype) for v in a.ravel(order="C"))
        name = self.emit(f"PyDSO.constant([{values}], {_jdims(a.shape)})", [], prefix="c")
        return name, name

    def atom(self, env: dict, a) -> str:
        if isinstance(a, jex_core.Literal):
            return self.constant(a.val)[0]
        return env[a]

    # -- equations
    def run(self, jaxpr, consts: Sequence, args: Sequence[str]) -> list[str]:
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = self.constant(c)[0]
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [self.atom(env, a) for a in eqn.invars]
            outs = self.equation(eqn, ins)
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
        return [self.atom(env, a) for a in jaxpr.outvars]

    def unsupported(self, eqn, why: str = "") -> ProblemError:
        name = eqn.primitive.name
        detail = f" ({why})" if why else ""
        return ProblemError(
            f"cannot translate {self.what} to Julia: the first unsupported JAX primitive is '{name}'{detail}, in "
            f"the equation `{str(eqn).strip()}`. The translator supports {', '.join(SUPPORTED_PRIMITIVES)}. "
            "Rewrite the function with those (static indices, jnp.where instead of lax.cond, no loops), or "
            "supply the Julia source yourself with pydso.backends.julia.JuliaModel(...)."
        )

    def equation(self, eqn, ins: list[str]) -> list[str]:
        name = eqn.primitive.name
        p = eqn.params
        in_avals = [a.aval for a in eqn.invars]
        out_avals = [v.aval for v in eqn.outvars]
        for aval in (*in_avals, *out_avals):
            dt = np.dtype(aval.dtype)
            if not (dt in (np.float32, np.float64, np.bool_) or np.issubdtype(dt, np.integer)):
                raise self.unsupported(eqn, f"dtype {dt} has no Julia counterpart here")
        if name in _CALLS:
            inner = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
            if inner is None:
                raise self.unsupported(eqn, "no inner jaxpr")
            if isinstance(inner, jex_core.ClosedJaxpr):
                return self.run(inner.jaxpr, inner.consts, ins)
            return self.run(inner, (), ins)
        if name in _ALIASES:
            return list(ins)
        if name in _UNARY:
            return [self.emit(_UNARY[name].format(*ins), ins)]
        if name in _BINARY:
            if name == "div" and not np.issubdtype(np.dtype(out_avals[0].dtype), np.floating):
                raise self.unsupported(eqn, "integer division")
            return [self.emit(_BINARY[name].format(*ins), ins)]
        out = out_avals[0]
        if name == "integer_pow":
            y = int(p["y"])
            return [self.emit(f"{ins[0]} .^ {f'({y})' if y < 0 else y}", ins)]
        if name == "select_n":
            return [self.emit(f"PyDSO.select_n.({', '.join(ins)})", ins)]
        if name == "clamp":  # lax.clamp(min, x, max)
            return [self.emit(f"clamp.({ins[1]}, {ins[0]}, {ins[2]})", ins)]
        if name == "convert_element_type":
            src, dst = np.dtype(in_avals[0].dtype), np.dtype(p["new_dtype"])
            if src == dst:
                return [ins[0]]
            if isinstance(eqn.invars[0], jex_core.Literal):
                return [_scalar_literal(np.asarray(eqn.invars[0].val).astype(dst), dst)]
            if dst == np.float64:
                return [self.emit(f"Float64.({ins[0]})", ins)]
            if dst == np.float32:
                return [self.emit(f"Float32.({ins[0]})", ins)]
            if dst == np.bool_:
                return [self.emit(f"{ins[0]} .!= 0", ins)]
            raise self.unsupported(eqn, f"conversion to {dst}")
        if name == "dot_general":
            (cl, cr), (bl, br) = p["dimension_numbers"]
            if bl or br:
                raise self.unsupported(eqn, "dot_general with batch dimensions (use jax.vmap outside the model)")
            rl, rr = len(in_avals[0].shape), len(in_avals[1].shape)
            jl = _tuple([rl - int(d) for d in cl])
            jr = _tuple([rr - int(d) for d in cr])
            return [self.emit(f"PyDSO.tensordot({ins[1]}, {ins[0]}, {jr}, {jl})", ins)]
        if name == "broadcast_in_dim":
            r_in, r_out = len(in_avals[0].shape), len(out.shape)
            bd = tuple(int(d) for d in p["broadcast_dimensions"])
            jmap = [r_out - bd[r_in - j] for j in range(1, r_in + 1)]
            return [self.emit(f"PyDSO.broadcast_in_dim({ins[0]}, {_jdims(out.shape)}, {_tuple(jmap)})", ins)]
        if name in ("reshape", "squeeze", "expand_dims"):
            if name == "reshape" and p.get("dimensions") is not None:
                raise self.unsupported(eqn, "reshape with a dimension permutation")
            if name == "squeeze" and out.shape == () and ins[0] in self.single_index:
                src, index = self.single_index[ins[0]]
                return [self.emit(f"{src}[{index}]", [src])]
            return [self.emit(f"PyDSO.reshape({ins[0]}, {_jdims(out.shape)})", ins)]
        if name == "transpose":
            perm = [int(d) for d in p["permutation"]]
            r = len(perm)
            jperm = [r - perm[r - k] for k in range(1, r + 1)]
            return [self.emit(f"permutedims({ins[0]}, {_tuple(jperm)})", ins)]
        if name == "concatenate":
            r = len(out.shape)
            return [self.emit(f"PyDSO.concatenate({_tuple(ins)}, {r - int(p['dimension'])})", ins)]
        if name == "stack":
            r = len(out.shape)
            return [self.emit(f"PyDSO.stack({_tuple(ins)}, {r - int(p['axis'])})", ins)]
        if name == "slice":
            shape = in_avals[0].shape
            starts = [int(s) + 1 for s in p["start_indices"]]
            stops = [int(s) for s in p["limit_indices"]]
            strides = [1] * len(shape) if p["strides"] is None else [int(s) for s in p["strides"]]
            o = self.emit(
                f"PyDSO.slice({ins[0]}, {_tuple(starts[::-1])}, {_tuple(stops[::-1])}, {_tuple(strides[::-1])})", ins
            )
            if len(shape) == 1 and out.shape == (1,):
                self.single_index[o] = (ins[0], starts[0])
            return [o]
        if name in ("reduce_sum", "reduce_max", "reduce_min"):
            r = len(in_avals[0].shape)
            jaxes = sorted(r - int(a) for a in p["axes"])
            return [self.emit(f"PyDSO.{name}({ins[0]}, {_tuple(jaxes)})", ins)]
        raise self.unsupported(eqn)

    def prune(self, outputs: Sequence[str]) -> list[_Line]:
        """Drop assignments no output depends on (every emitted expression is pure)."""
        needed = set(outputs)
        kept = []
        for line in reversed(self.lines):
            if line.out in needed:
                kept.append(line)
                needed.update(line.inputs)
        return kept[::-1]


def _abstract(tree: PyTree, dtype) -> PyTree:
    def one(leaf):
        a = jnp.asarray(leaf) if not isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ProblemError(
                f"theta leaves must be floating-point arrays for the Julia backend (one flat float vector), got "
                f"dtype {a.dtype}"
            )
        return jax.ShapeDtypeStruct(a.shape, dtype)

    return jax.tree_util.tree_map(one, tree)


def translate_function(
    fn: Callable, state_shape: tuple[int, ...], theta: PyTree, *, name: str, dtype=jnp.float64, what: str | None = None
) -> str:
    r"""Julia source of ``function name(t, x, theta) ... end`` computing ``fn(t, x, theta)``.

    ``fn`` is traced with :func:`jax.make_jaxpr` on a scalar ``t``, a state of shape ``state_shape`` and ``theta``'s
    shapes, all of floating dtype ``dtype``; its jaxpr is emitted one assignment per equation (repeated ones shared,
    dead ones dropped) in the layout of this module's docstring, ``theta`` arriving as the flat vector of
    :func:`theta_layout`.

    **Arguments:**

    - `fn`: ``fn(t, x, theta) -> array`` (a vector field, drift, diffusion or running cost).
    - `state_shape`: the shape of ``x``.
    - `theta`: the parameter pytree (values are not used, only shapes).
    - `name`: the Julia function name.
    - `dtype`: ``jnp.float64`` (default) or ``jnp.float32``: the precision of the emitted literals and conversions.
    - `what`: how errors name ``fn`` (default ``name``).

    **Returns:**

    The Julia source, a string. Raises :class:`~pydso.ProblemError` naming the first unsupported primitive.
    """
    what = what or name
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ProblemError(f"dtype must be float32 or float64 for the Julia translator, got {dtype}")
    t = jax.ShapeDtypeStruct((), dtype)
    x = jax.ShapeDtypeStruct(tuple(state_shape), dtype)
    theta_abs = _abstract(theta, dtype)
    try:
        closed = jax.make_jaxpr(fn)(t, x, theta_abs)
    except ProblemError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function failed to trace: say so with its error
        raise ProblemError(f"cannot trace {what} for the Julia translator: {type(e).__name__}: {e}") from e
    layout = theta_layout(theta)
    em = _Emitter(what)
    leaf_names = []
    for k, leaf in enumerate(layout, start=1):
        comment = f"theta{leaf.path}: JAX shape {leaf.shape}"
        expr = f"PyDSO.leaf(theta, {leaf.offset}, {_jdims(leaf.shape)})"
        em.lines.append(_Line(f"p{k}", expr, ("theta",), comment))
        leaf_names.append(f"p{k}")
    outs = em.run(closed.jaxpr, closed.consts, ["t", "x", *leaf_names])
    if len(outs) != 1:
        raise ProblemError(f"{what} must return one array, got {len(outs)} outputs")
    lines = em.prune(outs)
    # renumber the surviving temporaries v1, v2, ... (and constants c1, ...) in order of appearance
    counters = {"v": itertools.count(1), "c": itertools.count(1)}
    rename = {}
    for ln in lines:
        if ln.out[0] in counters:
            rename[ln.out] = f"{ln.out[0]}{next(counters[ln.out[0]])}"

    def renamed(text: str) -> str:
        return re.sub(r"\b[vc]\d+\b", lambda m: rename.get(m.group(0), m.group(0)), text)

    body = [f"    {renamed(ln.out)} = {renamed(ln.expr)}" + (f"  # {ln.comment}" if ln.comment else "") for ln in lines]
    body.append(f"    return {renamed(outs[0])}")
    return f"function {name}(t, x, theta)\n" + "\n".join(body) + "\nend\n"


def translate_problem(problem: Problem, theta: PyTree, *, dtype=jnp.float64, prefix: str = "pydso") -> JuliaModel:
    r"""Translate an :class:`~pydso.ODESystem` or :class:`~pydso.SDESystem` problem to a :class:`JuliaModel`.

    Emits ``{prefix}_vector_field`` (the drift for SDEs), ``{prefix}_running_cost`` and, for SDEs,
    ``{prefix}_diffusion``, preceded by a header that documents the ``theta`` layout. Terminal costs, initial
    states, Brownian increments and SDE log-densities stay in JAX (the backend evaluates them on the returned
    states), so they need no translation.

    **Arguments:**

    - `problem`: the problem; its state shape is that of ``problem.initial``.
    - `theta`: the parameter pytree.
    - `dtype`: float64 (default) or float32 (e.g. for ``EnsembleGPUKernel`` in single precision).
    - `prefix`: the prefix of the Julia function names.

    **Returns:**

    A :class:`JuliaModel`. Raises :class:`~pydso.ProblemError` for other systems and for the first unsupported
    primitive.
    """
    system = problem.system
    if not isinstance(system, ODESystem | SDESystem):
        raise ProblemError(
            f"the Julia backend simulates ODESystem and SDESystem problems, got a {type(system).__name__}; "
            "use the JAX backend for discrete-time chains"
        )
    shape = problem.state_shape
    if len(shape) != 1:
        raise ProblemError(f"the Julia backend needs a vector state, got the state shape {shape}")
    layout = theta_layout(theta)
    header = [
        f"# Generated by pydso.backends.julia.translate_problem from the jaxprs of problem {problem.name!r}.",
        "# Layout: a JAX array of shape (s1, ..., sr) is the Julia array of size (sr, ..., s1) with the same memory.",
        f"# x: the state, a vector of length {shape[0]}; t: the time; theta: the flat vector ravel_pytree(theta)[0]",
        f"# of length {sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in layout)} with the leaves",
    ]
    for leaf in layout:
        n = int(np.prod(leaf.shape, dtype=np.int64))
        header.append(f"#   theta{leaf.path}: shape {leaf.shape} at theta[{leaf.offset + 1}:{leaf.offset + n}]")
    names = {"vector_field": f"{prefix}_vector_field", "running_cost": f"{prefix}_running_cost"}
    if isinstance(system, ODESystem):
        fns = {"vector_field": system.vector_field}
        kind = "ode"
    else:
        fns = {"vector_field": system.drift, "diffusion": system.diffusion}
        names["diffusion"] = f"{prefix}_diffusion"
        kind = "sde"
    fns["running_cost"] = problem.running_cost
    parts = ["\n".join(header) + "\n"]
    for role in ("vector_field", "diffusion", "running_cost"):
        if role in fns:
            what = {"vector_field": "the vector field" if kind == "ode" else "the drift"}.get(role, f"the {role}")
            what = what.replace("running_cost", "running cost")
            parts.append(translate_function(fns[role], shape, theta, name=names[role], dtype=dtype, what=what))
    return JuliaModel(
        kind=kind,
        source="\n".join(parts),
        vector_field=names["vector_field"],
        running_cost=names["running_cost"],
        diffusion=names.get("diffusion"),
    )
