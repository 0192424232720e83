r"""Interchange with Minari, the offline-RL dataset format (Farama): :func:`from_minari` and :func:`to_minari`.

A Minari episode of :math:`T` steps holds ``observations`` (:math:`T+1`), ``actions``, ``rewards``,
``terminations``, ``truncations`` (:math:`T` each) and ``infos`` (:math:`T+1` entries: the reset's, then one per
step). The pydso schema (:mod:`pydso.data`) stores the same episode as

==========================  ===================================================================================
pydso variable              Minari
==========================  ===================================================================================
``state[e, :T+1]``          ``observations`` (flat ``Box`` spaces only; a scalar observation becomes one feature)
``input[e, :T]``            ``actions`` (``Box`` or ``Discrete``; the last time index is NaN)
``cost[e, :T]``             ``-rewards`` (pydso *minimises* cost: the sign is flipped)
``terminations[e, :T]``     ``terminations`` (bool; extra per-step variable, False on padding)
``truncations[e, :T]``      ``truncations`` (bool; extra per-step variable)
``behavior_logp[e, :T]``    the behaviour log-density of step :math:`t` (see below)
``mask[e]``                 True on the :math:`T+1` recorded states (episodes may have different lengths)
==========================  ===================================================================================

**The behaviour log-density.** Importance weighting needs :math:`\log B` of every logged step. Minari has no such
field; :func:`from_minari` takes it from the user's policy (a function of the observations and actions of an
episode, e.g. :math:`\log\pi(a_t \mid o_t)`) or from a per-step entry of the dataset's ``infos`` (entry ``t + 1``
belongs to step ``t``: the info returned by that step). :func:`to_minari` writes ``behavior_logp`` back to
``infos["behavior_logp"]`` (NaN in the reset entry), which :func:`from_minari` reads by default. When the
behaviour log-density is that of a *policy*, the plant's density is the same under the behaviour and the target
and cancels from the importance ratios only if the target's transition density is written over the same variables
(e.g. a state that includes the action); pydso cannot check this.

Neither function deletes or overwrites anything: :func:`to_minari` refuses an existing dataset id, and
:func:`from_minari` with ``path=`` refuses an existing store (:func:`pydso.data.save` without ``overwrite``).
Minari (``pip install "minari[hdf5]"``, the ``offline`` extra of pydso) is imported only when these are called.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from ._schema import DatasetError, make_dataset, validate

__all__ = ["from_minari", "to_minari"]


def _minari():
    try:
        import minari
    except ImportError:
        raise DatasetError(
            'Minari interchange needs the minari package: pip install "minari[hdf5]" (pydso\'s "offline" extra)'
        ) from None
    return minari


def _flat(value: Any, what: str, dataset_id: str, episode: int) -> np.ndarray:
    if isinstance(value, dict | tuple | list) and not isinstance(value, np.ndarray):
        raise DatasetError(
            f"Minari dataset {dataset_id!r}, episode {episode}: {what} are a {type(value).__name__} (a Dict or Tuple "
            "space); pydso reads flat Box or Discrete spaces only: flatten them first (gymnasium.spaces.flatten)"
        )
    a = np.asarray(value)
    if a.ndim == 1:
        a = a[:, None]
    elif a.ndim > 2:
        a = a.reshape(a.shape[0], -1)
    return a


def _pad(rows: list[np.ndarray], length: int, fill: Any, dtype: Any) -> np.ndarray:
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def from_minari(
    dataset: Any,
    *,
    behavior_logp: "str | Callable[[np.ndarray, np.ndarray], Any] | None" = None,
    path: "str | os.PathLike | None" = None,
    system: str | None = None,
) -> xr.Dataset:
    r"""Read a Minari dataset into a pydso trajectory dataset (module docstring for the mapping).

    **Arguments:**

    - ``dataset``: a ``minari.MinariDataset`` or the id of a dataset stored locally (``MINARI_DATASETS_PATH``);
      nothing is downloaded.
    - ``behavior_logp``: the behaviour log-density of each step: a function ``(observations (T+1, d), actions (T, m))
      -> (T,)`` (e.g. the logging policy's :math:`\log\pi(a_t\mid o_t)`), or the name of a per-step entry of the
      dataset's ``infos`` (entry ``t + 1`` for step ``t``). Default: ``infos["behavior_logp"]`` if the dataset has
      it (as written by :func:`to_minari`), else none (the dataset then serves system identification, not
      importance weighting).
    - ``path``: also save the result as a pydso store there (:func:`pydso.data.save`; an existing path is refused).
    - ``system``: the ``system`` attribute (default: the dataset's environment id, else its dataset id).

    **Returns:** a validated ``xarray.Dataset`` of the pydso schema (in memory).

    **Raises:** :class:`~pydso.DatasetError` for an unknown dataset id, non-flat spaces, a missing ``infos`` entry,
    or log-densities of the wrong shape or not finite.
    """
    minari = _minari()
    if isinstance(dataset, str | os.PathLike):
        dataset_id = str(dataset)
        try:
            dataset = minari.load_dataset(dataset_id, download=False)
        except Exception as e:  # minari raises FileNotFoundError / ValueError for unknown ids
            raise DatasetError(
                f"dataset: no local Minari dataset {dataset_id!r} ({e}); pydso does not download: set "
                "MINARI_DATASETS_PATH or pass a minari.MinariDataset"
            ) from None
    if not hasattr(dataset, "iterate_episodes"):
        raise DatasetError(f"dataset must be a minari.MinariDataset or a dataset id, got {type(dataset).__name__}")
    dataset_id = str(dataset.id)
    if behavior_logp is not None and not (isinstance(behavior_logp, str) or callable(behavior_logp)):
        raise DatasetError(
            f"behavior_logp must be an infos key (str), a function (observations, actions) -> log-densities, or "
            f"None; got {type(behavior_logp).__name__}"
        )
    states, actions, rewards, terms, truncs, logps = [], [], [], [], [], []
    for ep in dataset.iterate_episodes():
        i = int(ep.id)
        obs = _flat(ep.observations, "observations", dataset_id, i).astype(np.float64)
        act = _flat(ep.actions, "actions", dataset_id, i).astype(np.float64)
        T = len(ep.rewards)
        if obs.shape[0] != T + 1 or act.shape[0] != T:
            raise DatasetError(
                f"Minari dataset {dataset_id!r}, episode {i}: {obs.shape[0]} observations and {act.shape[0]} actions "
                f"for {T} rewards; expected T+1 and T"
            )
        states.append(obs)
        actions.append(act)
        rewards.append(np.asarray(ep.rewards, np.float64))
        terms.append(np.asarray(ep.terminations, bool))
        truncs.append(np.asarray(ep.truncations, bool))
        key = behavior_logp
        if key is None and "behavior_logp" in (ep.infos or {}):
            key = "behavior_logp"
        if key is None:
            continue
        if callable(key):
            lp = np.asarray(key(obs, act), np.float64).reshape(-1)
            what = "behavior_logp(observations, actions)"
        else:
            if key not in (ep.infos or {}):
                raise DatasetError(
                    f"behavior_logp={key!r}: Minari dataset {dataset_id!r}, episode {i} has no infos entry {key!r} "
                    f"(it has {sorted(ep.infos or {})}); record it with DataCollector(record_infos=True) or pass a "
                    "function of the observations and actions"
                )
            lp = np.asarray(ep.infos[key], np.float64).reshape(-1)
            lp = lp[1:] if lp.shape[0] == T + 1 else lp
            what = f"infos[{key!r}]"
        if lp.shape != (T,):
            raise DatasetError(
                f"{what} of Minari dataset {dataset_id!r}, episode {i} has {lp.shape[0]} values; expected one per step "
                f"({T}, or {T + 1} with the reset entry first)"
            )
        if not np.all(np.isfinite(lp)):
            raise DatasetError(f"{what} of Minari dataset {dataset_id!r}, episode {i} has non-finite values")
        logps.append(lp)
    if not states:
        raise DatasetError(f"Minari dataset {dataset_id!r} has no episodes")
    if logps and len(logps) != len(states):
        raise DatasetError(f"Minari dataset {dataset_id!r}: infos['behavior_logp'] is on some episodes only")
    length = max(s.shape[0] for s in states)
    mask = _pad([np.ones(s.shape[0], bool) for s in states], length, False, bool)
    spec = getattr(dataset, "env_spec", None)
    ds = make_dataset(
        _pad(states, length, np.nan, np.float64),
        input=_pad(actions, length, np.nan, np.float64),
        cost=_pad([-r for r in rewards], length, np.nan, np.float64),
        behavior_logp=_pad(logps, length, np.nan, np.float64) if logps else None,
        mask=mask,
        system=system if system is not None else (getattr(spec, "id", None) or dataset_id),
        attrs={"minari_dataset_id": dataset_id, "cost_is": "-reward"},
    )
    ds["terminations"] = (("episode", "time"), _pad(terms, length, False, bool))
    ds["truncations"] = (("episode", "time"), _pad(truncs, length, False, bool))
    ds = validate(ds)
    if path is not None:
        from ._store import save

        save(ds, path)
    return ds


def to_minari(
    ds: "xr.Dataset | str | os.PathLike",
    dataset_id: str,
    *,
    env: Any = None,
    observation_space: Any = None,
    action_space: Any = None,
    algorithm_name: str | None = None,
    author: str | None = None,
    description: str | None = None,
    data_format: str | None = None,
) -> Any:
    r"""Write a pydso trajectory dataset (or store) as a new Minari dataset (module docstring for the mapping).

    **Arguments:**

    - ``ds``: a dataset of the pydso schema with ``input`` (the actions) and ``cost`` (rewards are ``-cost``), or
      the path of a store (:func:`pydso.data.open`).
    - ``dataset_id``: the new Minari id, ``(namespace/)(env_name/)name-v<version>``; stored under
      ``MINARI_DATASETS_PATH``. An existing id is refused (nothing is overwritten).
    - ``env``: the gymnasium environment (id, spec or ``Env``) the data come from, for Minari's metadata and
      spaces; or give ``observation_space`` and ``action_space`` (default: unbounded ``Box`` spaces of the data's
      widths).
    - ``algorithm_name``, ``author``, ``description``, ``data_format`` (``"hdf5"`` or ``"arrow"``): passed to
      Minari.

    Terminations and truncations come from the variables ``terminations`` / ``truncations`` if present; otherwise an
    episode shorter than the dataset's time axis ends in a termination (pydso records ragged episodes when they
    enter a terminal set) and a full-length one in a truncation. ``behavior_logp`` goes to
    ``infos["behavior_logp"]``.

    **Returns:** the new ``minari.MinariDataset``.
    """
    minari = _minari()
    if isinstance(ds, str | os.PathLike):
        from ._store import open as open_store

        ds = open_store(ds)
    ds = validate(ds)
    for name, why in (("input", "actions"), ("cost", "rewards (-cost)")):
        if name not in ds.data_vars:
            raise DatasetError(
                f"ds has no {name!r} variable: Minari episodes need {why}; add it to the dataset (make_dataset("
                f"..., {name}=...))"
            )
    if not isinstance(dataset_id, str) or not dataset_id:
        raise DatasetError(f"dataset_id must be a non-empty string such as 'pydso/pendulum-v0', got {dataset_id!r}")
    from minari.storage import get_dataset_path

    target = get_dataset_path(dataset_id)
    if os.path.exists(target):
        raise DatasetError(
            f"dataset_id: a Minari dataset {dataset_id!r} already exists at {target}; pydso never overwrites it: "
            "choose another id or version"
        )
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    state = np.asarray(ds["state"].values, np.float64)
    n, length = state.shape[:2]
    mask = np.asarray(ds["mask"].values, bool) if "mask" in ds.data_vars else np.ones((n, length), bool)
    inputs = np.asarray(ds["input"].values, np.float64)
    cost = np.asarray(ds["cost"].values, np.float64)
    blp = np.asarray(ds["behavior_logp"].values, np.float64) if "behavior_logp" in ds.data_vars else None
    terms = np.asarray(ds["terminations"].values, bool) if "terminations" in ds.data_vars else None
    truncs = np.asarray(ds["truncations"].values, bool) if "truncations" in ds.data_vars else None
    buffers = []
    for e in range(n):
        T = int(mask[e].sum()) - 1
        if T < 1:
            raise DatasetError(f"episode {e} of ds has {T + 1} recorded state(s); a Minari episode needs a step")
        term = terms[e, :T] if terms is not None else np.zeros(T, bool)
        trunc = truncs[e, :T] if truncs is not None else np.zeros(T, bool)
        if terms is None and truncs is None:
            (term if T + 1 < length else trunc)[-1] = True
        infos = {}
        if blp is not None:
            infos["behavior_logp"] = np.concatenate([[np.nan], blp[e, :T]])
        buffers.append(
            EpisodeBuffer(
                id=e,
                observations=state[e, : T + 1],
                actions=inputs[e, :T],
                rewards=list(-cost[e, :T]),
                terminations=list(term),
                truncations=list(trunc),
                infos=infos,
            )
        )
    if env is None:
        if observation_space is None:
            observation_space = gym.spaces.Box(-np.inf, np.inf, (state.shape[2],), np.float64)
        if action_space is None:
            action_space = gym.spaces.Box(-np.inf, np.inf, (inputs.shape[2],), np.float64)
    kwargs = {} if data_format is None else {"data_format": data_format}
    attrs = {k: ds.attrs[k] for k in ("system", "parameters") if k in ds.attrs}
    text = (
        description if description is not None else f"exported by pydso from a trajectory dataset {json.dumps(attrs)}"
    )
    return minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=env,
        eval_env=env,
        observation_space=observation_space,
        action_space=action_space,
        algorithm_name=algorithm_name if algorithm_name is not None else "pydso",
        author=author,
        description=text,
        **kwargs,
    )
