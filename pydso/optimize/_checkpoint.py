r"""Checkpoints of :func:`pydso.minimize`: one ``.npz`` file holding everything a run needs to resume bit for bit.

Contents: the parameters, the method's state and the best parameters leaf by leaf (``theta/i``, ``state/i``,
``best_theta/i``), the history (``history/<name>``), and a JSON record (``meta``) with the format version, the
number of completed steps, the best objective, the PRNG key data, a *fingerprint* (the method's
:meth:`~pydso.optimize.AbstractMethod.describe` and the problem's name) and a *signature* of the pytrees (leaf
paths, shapes and dtypes of ``theta``; leaf paths, ranks and dtypes of the state, whose sizes may change from step
to step, e.g. a growing store of episodes). Loading refuses a checkpoint whose signature, key or fingerprint differs
from the run's, naming what differs. Files are written atomically (:func:`pydso._io.atomic_write`): an interrupted
write leaves the previous checkpoint intact.
"""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ProblemError
from .._io import atomic_write
from .._typing import PyTree

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "save_checkpoint", "load_checkpoint", "tree_signature"]

CHECKPOINT_FORMAT = 2
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
    changed = {k: (stored.get(k), v) for k, v in fingerprint.items() if stored.get(k) != v}
    if changed:
        what = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in changed.items())
        raise ProblemError(
            f"checkpoint {path!r} does not match this run ({what}); resume with the same settings, or delete the "
            "checkpoint to start afresh"
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
