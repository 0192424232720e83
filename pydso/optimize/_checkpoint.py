r"""Checkpoints of :func:`pydso.minimize`: one ``.npz`` file holding everything a run needs to resume bit for bit.

Contents: the parameters, the method's state and the best parameters leaf by leaf (``theta/i``, ``state/i``,
``best_theta/i``), the history (``history/<name>``), and a JSON record (``meta``) with the format version, the
number of completed steps, the best objective, the PRNG key data, a *fingerprint* (:func:`run_fingerprint`) and a
*signature* of the pytrees (leaf paths, shapes and dtypes of ``theta``; leaf paths, ranks and dtypes of the state,
whose sizes may change from step to step, e.g. a growing store of episodes). Loading refuses a checkpoint whose
signature, key or fingerprint differs from the run's, naming what differs. Files are written atomically
(:func:`pydso._io.atomic_write`): an interrupted write leaves the previous checkpoint intact, and the temporary
file of a killed run is removed by the next write.

The fingerprint hashes each part of the problem — the system, the cost, the terminal cost, the setting, the initial
distribution and the problem's own fields — and each setting of the method (the optax optimiser's hyperparameters,
the estimator, ``n``, ...). A callable is fingerprinted by its jaxpr (with the values of the arrays it closes
over) where it can be traced with the problem's shapes, else by its bytecode and closure; arrays by their bytes.
So resuming after a change of the cost, the dynamics, the learning rate or ``n`` is refused with a message such as
``the cost changed, the method's optimizer changed (hyperparameters such as the learning rate)``, instead of
silently mixing two runs.
"""

import dataclasses
import hashlib
import json
import os
import re
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ProblemError
from .._io import atomic_write
from .._typing import PyTree

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "tree_signature",
    "run_fingerprint",
]

CHECKPOINT_FORMAT = 3
"""Version of the checkpoint layout; files of another version are refused."""


class Checkpoint(eqx.Module):
    r"""The resumable state of a :func:`pydso.minimize` run after ``step`` completed steps.

    **Attributes:**

    - ``theta``: the parameters after ``step`` steps.
    - ``state``: the method's state (a pytree of arrays).
    - ``best_theta``, ``best_objective``: the parameters with the lowest objective estimate so far, and it.
    - ``history``: dict ``name -> list`` of per-step values (``step`` entries each).
    - ``step``: the number of completed steps.
    """

    theta: PyTree
    state: PyTree
    best_theta: PyTree
    best_objective: float
    history: dict
    step: int


def tree_signature(tree: PyTree, *, shapes: bool = True) -> list:
    """Process-independent description of a pytree's leaves: ``[path, shape or rank, dtype]`` per leaf."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        out.append([jax.tree_util.keystr(path), list(a.shape) if shapes else a.ndim, str(a.dtype)])
    return out


_LIBRARY_MODULES = ("pydso", "diffrax", "equinox", "optax", "jax", "lineax", "optimistix", "numpy", "builtins")
_MAX_DEPTH = 12
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def _array_digest(a) -> str:
    a = np.asarray(a)
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = np.asarray(jax.random.key_data(a))
    h = hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=12).hexdigest()
    return f"{a.dtype}{list(a.shape)}:{h}"


def _code_digest(code: types.CodeType) -> list:
    consts = [_code_digest(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return [code.co_name, hashlib.blake2b(code.co_code, digest_size=12).hexdigest(), consts, list(code.co_names)]


class _Describer:
    """Process-independent description of problems and methods (see the module docstring)."""

    def __init__(self, signatures):
        self.signatures = signatures  # candidate argument tuples for tracing callables
        self.seen: set[int] = set()

    def jaxpr(self, fn):
        for args in self.signatures:
            try:
                closed = jax.make_jaxpr(fn)(*args)
            except Exception:  # noqa: BLE001 - not this signature: try the next one
                continue
            text = _ADDRESS.sub("0x?", str(closed.jaxpr))  # e.g. a pure_callback's function: its address varies
            return {"jaxpr": text, "consts": [self(c, 1) for c in closed.consts]}
        return None

    def callable(self, fn, depth):
        traced = self.jaxpr(fn) if not isinstance(fn, type) else None
        if traced is not None:
            return {"fn": getattr(fn, "__qualname__", type(fn).__name__), **traced}
        code = getattr(fn, "__code__", None)
        out = {"fn": getattr(fn, "__qualname__", type(fn).__name__)}
        if isinstance(code, types.CodeType):
            out["code"] = _code_digest(code)
            cells = getattr(fn, "__closure__", None) or ()
            out["closure"] = [self(self._cell(c), depth + 1) for c in cells]
            out["defaults"] = self(getattr(fn, "__defaults__", None), depth + 1)
        return out

    @staticmethod
    def _cell(cell):
        try:
            return cell.cell_contents
        except ValueError:  # an empty cell
            return None

    def __call__(self, obj, depth: int = 0):
        if depth > _MAX_DEPTH:
            return "..."
        if obj is None or isinstance(obj, bool | int | float | str | complex):
            return repr(obj)
        if isinstance(obj, np.generic):
            return repr(obj.item())
        if isinstance(obj, jax.Array | np.ndarray):
            return _array_digest(obj)
        if hasattr(obj, "data_vars") and hasattr(obj, "sizes"):  # an xarray dataset (logged data)
            return f"Dataset({dict(obj.sizes)}, {_digest(sorted(map(str, obj.data_vars)))})"
        if id(obj) in self.seen:
            return "<cycle>"
        self.seen.add(id(obj))
        try:
            if isinstance(obj, dict):
                return {str(k): self(v, depth + 1) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return [type(obj).__name__, [self(v, depth + 1) for v in obj]]
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # equinox modules included
                out = {"type": f"{type(obj).__module__}.{type(obj).__qualname__}"}
                if not type(obj).__module__.startswith(_LIBRARY_MODULES):  # a user class: its methods' code too
                    out["methods"] = {
                        k: _code_digest(v.__code__)
                        for k, v in sorted(vars(type(obj)).items())
                        if isinstance(v, types.FunctionType)
                    }
                for f in dataclasses.fields(obj):
                    out[f.name] = self(getattr(obj, f.name, None), depth + 1)
                return out
            if callable(obj):
                return self.callable(obj, depth)
            return f"<{type(obj).__module__}.{type(obj).__qualname__}>"
        finally:
            self.seen.discard(id(obj))


_PROBLEM_PARTS = {
    "system": "the system (dynamics)",
    "cost": "the cost",
    "terminal_cost": "the terminal cost",
    "setting": "the setting (horizon, discount, terminal set)",
    "initial": "the initial distribution",
}


def run_fingerprint(problem, theta: PyTree, method) -> dict[str, str]:
    """A process-independent fingerprint of a :func:`pydso.minimize` run: one short hash per part of the problem
    (its dataclass fields: ``system``, ``cost``, ``terminal_cost``, ``setting``, ``initial`` and the rest) and per
    field of the method (``optimizer``, ``estimator``, ``n``, ``learning_rate``, ...), plus the method's
    :meth:`~pydso.optimize.AbstractMethod.describe`. Two runs with equal fingerprints simulate the same problem with
    the same method; :func:`load_checkpoint` names the keys that differ.

    **Arguments:**

    - ``problem``: a :class:`~pydso.Problem` (or any dataclass / equinox module, e.g. a least-squares problem).
    - ``theta``: the initial parameters (their shapes are used to trace callables).
    - ``method``: the :class:`~pydso.optimize.AbstractMethod`.

    **Returns:** a dict ``{"problem.<field>": hash, "method.<field>": hash, "method": describe()}``.
    """
    try:
        x = jax.eval_shape(problem.initial.sample, jax.random.key(0))
        x = jnp.zeros(x.shape, x.dtype)
    except Exception:  # noqa: BLE001 - a problem without an initial distribution (least squares)
        x = None
    key = jax.random.key(0)
    t = jnp.zeros((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    candidates = [(x, theta), (t, x, theta), (key, t, x, theta), (key, x, theta), (x,), (theta,), (t, x, x, theta)]
    candidates = [c for c in candidates if x is not None or all(a is not None for a in c)]
    describe = _Describer(candidates)
    out = {}
    if dataclasses.is_dataclass(problem):
        for f in dataclasses.fields(problem):
            out[f"problem.{f.name}"] = _digest(describe(getattr(problem, f.name, None)))
        out["problem.type"] = f"{type(problem).__module__}.{type(problem).__qualname__}"
        if not type(problem).__module__.startswith(_LIBRARY_MODULES):
            out["problem.methods"] = _digest(describe(problem)["methods"])
    else:
        out["problem"] = _digest(describe(problem))
    out["method"] = method.describe()
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            out[f"method.{f.name}"] = _digest(describe(getattr(method, f.name, None)))
    return out


def _explain(key: str) -> str:
    if key.startswith("problem."):
        part = key.split(".", 1)[1]
        return f"{_PROBLEM_PARTS.get(part, f'the problem field {part!r}')} changed"
    if key == "method":
        return "the method changed"
    name = key.split(".", 1)[1]
    hint = {
        "optimizer": " (hyperparameters such as the learning rate or the schedule)",
        "n": " (episodes per step)",
        "estimator": " (estimator or its baseline)",
    }.get(name, "")
    return f"the method's {name}{hint} changed"


def _signatures(theta, state) -> dict:
    return {"theta": tree_signature(theta), "state": tree_signature(state, shapes=False)}


def save_checkpoint(path: "str | os.PathLike", checkpoint: Checkpoint, *, key: jax.Array, fingerprint: dict) -> None:
    """Write ``checkpoint`` to ``path`` atomically, with the run's ``key`` and ``fingerprint`` (a JSON-able dict)."""
    arrays = {}
    for name in ("theta", "state", "best_theta"):
        for i, leaf in enumerate(jax.tree.leaves(getattr(checkpoint, name))):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
    for name, values in checkpoint.history.items():
        arrays[f"history/{name}"] = np.asarray(values)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": int(checkpoint.step),
        "best_objective": float(checkpoint.best_objective),
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "fingerprint": fingerprint,
        "signature": _signatures(checkpoint.theta, checkpoint.state),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_write(path, "wb", suffix=".tmp.npz") as f:
        np.savez(f, **arrays)


def load_checkpoint(
    path: "str | os.PathLike", *, theta: PyTree, state: PyTree, key: jax.Array, fingerprint: dict
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` for a run whose initial ``theta`` and method ``state``
    (templates of the pytree structures), ``key`` and ``fingerprint`` are given; raise
    :class:`~pydso.ProblemError` naming the difference if it belongs to another run."""
    path = os.fspath(path)
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ProblemError(f"checkpoint {path!r} is not a readable pydso checkpoint: {e}") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ProblemError(
            f"checkpoint {path!r} has format {meta.get('format')!r}, this pydso writes format {CHECKPOINT_FORMAT}; "
            "delete it to start afresh"
        )
    expected = _signatures(theta, state)
    for name, what in (("theta", "theta"), ("state", "method state")):
        found = meta["signature"][name]
        if found != expected[name]:
            raise ProblemError(
                f"checkpoint {path!r} does not match this run: its {what} has leaves {found}, this run expects "
                f"{expected[name]} (different theta pytree structure, method or optimizer?)"
            )
    if meta["key"] != np.asarray(jax.random.key_data(key)).tolist():
        raise ProblemError(
            f"checkpoint {path!r} was written by a run with a different key; pass the same key to resume, "
            "or delete the checkpoint to start afresh"
        )
    stored = meta.get("fingerprint", {})
    changed = [k for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)]
    if changed:
        what = "; ".join(_explain(k) for k in changed)
        if "method" in changed:
            what += f" (method: checkpoint {stored.get('method')!r}, this run {fingerprint.get('method')!r})"
        raise ProblemError(
            f"checkpoint {path!r} does not match this run: {what}. Resuming would mix two different runs; resume "
            "with the same problem and method settings, or pass another checkpoint path (or delete this one) to "
            "start afresh"
        )
    trees = {}
    for name, template in (("theta", theta), ("state", state), ("best_theta", theta)):
        treedef = jax.tree.structure(template)
        trees[name] = jax.tree.unflatten(
            treedef, [jnp.asarray(arrays[f"{name}/{i}"]) for i in range(treedef.num_leaves)]
        )
    history = {k.split("/", 1)[1]: list(v) for k, v in arrays.items() if k.startswith("history/")}
    return Checkpoint(
        trees["theta"], trees["state"], trees["best_theta"], meta["best_objective"], history, meta["step"]
    )
