"""Batch runs over many datasets on Dask: one system-identification fit per experiment.

:func:`fit_many` runs :func:`pydso.problems.sysid.fit` once per experiment on a Dask cluster — an in-process
cluster by default (threads: the JAX compilation is then shared by all tasks), a ``LocalCluster`` of processes
when ``processes=True``, or any running cluster given by ``scheduler=ADDRESS`` or ``client=``. Each worker
compiles the fit once per model and data shape and reuses it for every later experiment of that shape.

Results come back as an ``xarray.Dataset`` (experiment x parameter: ``estimate``, ``stderr``, ``ci_low``,
``ci_high``; experiment x output_dim: ``rmse``, ``nrmse``, ``fit_percent``; per experiment ``status``
(``ok`` / ``not_converged`` / ``failed``), ``error``, ``cost``, ``n_steps``, ``wall_s``), written to zarr at
``out`` as the batch proceeds (crash-safe: written beside it, then swapped in). ``out`` must be new or a results
store pydso wrote (attribute ``created_by``): any other file or directory there is refused with
:class:`SysIdError` and left untouched. A failing experiment (bad data, diverging solve) is recorded with its
error and the batch goes on; re-running with the same ``out`` skips the experiments already recorded
(``resume=True``).

Joint fits (``joint=True, shared=[...]``): the experiments are fitted together by
:func:`pydso.problems.sysid.fit_joint` — the parameters named in ``shared`` are common to all experiments, the
others (and the initial states) per experiment, all in one Levenberg–Marquardt problem. A joint fit is a single
optimisation, so it runs as **one** Dask task on one worker (the cluster gives no parallelism across experiments
there; the residuals of all experiments are vmapped inside that task). The experiments must have equal shapes
(episodes x samples x channels). Its results dataset has the same layout (``estimate`` etc. over experiment x
parameter, shared parameters repeated in every row with the same joint value and interval and flagged by the
boolean coordinate ``shared(parameter)``), plus ``cov(joint_row, joint_col)`` over the joint vector and the
attributes ``joint``, ``shared``, ``sigma2``, ``dof`` (see :meth:`~pydso.problems.sysid.JointSysIdResult.to_dataset`).
If the joint fit fails, every experiment is recorded as failed with its error.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..._io import load_object
from ._errors import SysIdError, SysIdWarning
from ._models import StateSpaceModel

__all__ = [
    "fit_many",
    "fit_one",
    "load_model",
    "expand_paths",
    "open_results",
    "write_results",
    "is_results_store",
    "RESULTS_MARKER",
]

RESULTS_MARKER = "pydso.problems.sysid.fit_many"
"""The value of the ``created_by`` attribute that marks a results store written by pydso (the only kind of store
:func:`write_results` replaces)."""

_MODEL_CACHE: dict[str, Any] = {}


def load_model(spec):
    """A sysid model from ``'package.module:factory'`` or ``'path/to/file.py:factory'`` (loaded by
    :func:`pydso._io.load_object`; the factory is called without arguments; cached per process and spec), a
    zero-argument callable returning a model, or a model itself. Raises :class:`SysIdError` naming the spec."""
    if isinstance(spec, str):
        if spec in _MODEL_CACHE:
            return _MODEL_CACHE[spec]
        obj = load_object(spec, what=f"model {spec!r}", error=SysIdError)
        model = _as_model(
            _call_factory(obj, spec) if callable(obj) and not isinstance(obj, StateSpaceModel) else obj, spec
        )
        _MODEL_CACHE[spec] = model
        return model
    if callable(spec) and not isinstance(spec, StateSpaceModel):
        name = getattr(spec, "__name__", repr(spec))
        return _as_model(_call_factory(spec, name), name)
    return _as_model(spec, repr(spec))


def _call_factory(factory, what):
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say which, with its error and traceback
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None))
        raise SysIdError(
            f"model {what!r}: calling the factory failed: {type(e).__name__}: {e}\nfactory traceback:\n{tb}"
        ) from e


def _as_model(obj, what):
    if not isinstance(obj, StateSpaceModel):
        raise SysIdError(
            f"model {what}: expected a pydso.problems.sysid ContinuousModel or DiscreteModel (or a zero-argument "
            f"factory returning one), got {type(obj).__name__}"
        )
    return obj


def expand_paths(data: str | Sequence[str]) -> list[str]:
    """Paths from a path, a glob pattern, a comma-separated list, or a list of those (sorted per pattern)."""
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            hits = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            if not hits:
                raise FileNotFoundError(f"no data matches {part!r}")
            out += hits
    return out


READERS = {".csv": "from_csv", ".txt": "from_csv", ".npz": "from_npz", ".mat": "from_mat"}
"""File extensions read by :mod:`pydso.data`'s readers (with ``read_options``: ``columns``, ``dt``, ...)."""


def load_dataset(path, read_options: dict | None = None) -> xr.Dataset:
    """A dataset from ``path``: a pydso store, a zarr store, or a CSV / NPZ / MAT record read by
    :func:`pydso.data.from_csv` / :func:`~pydso.data.from_npz` / :func:`~pydso.data.from_mat` with
    ``read_options`` (``columns={'input': [...], 'output': [...]}``, ``dt``, and for CSV ``skip_rows``, ...)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in READERS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {path!r} does not exist")
        opts = dict(read_options or {})
        missing = [k for k in ("columns", "dt") if k not in opts]
        if missing:
            raise SysIdError(
                f"dataset {path!r} is a {ext} record: reading it needs {missing} (read_options={{'columns': "
                "{'input': ['u'], 'output': ['y']}, 'dt': 0.01}; CLI: --columns input=u output=y --dt 0.01)"
            )
        import pydso.data as pdata

        if ext not in (".csv", ".txt"):
            opts.pop("skip_rows", None)
            opts.pop("delimiter", None)
        return getattr(pdata, READERS[ext])(path, **opts)
    return _load(path)


def _load(path: str) -> xr.Dataset:
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {path!r} does not exist")
    try:
        from pydso.data import open as open_dataset
    except ImportError:  # pragma: no cover - fallback while pydso.data is incomplete
        open_dataset = None
    if open_dataset is not None and os.path.exists(os.path.join(path, "pydso.json")):
        return open_dataset(path).load()  # a pydso store: its errors (corrupt, foreign parts) are the real ones
    try:
        return xr.open_zarr(path).load()  # a plain zarr store written by xarray
    except Exception as e:  # noqa: BLE001 - report the path, not zarr's internals
        raise SysIdError(
            f"dataset {path!r} is neither a pydso store nor a readable zarr store, nor a CSV/NPZ/MAT record "
            f"({', '.join(READERS)}): {e}"
        ) from None


def _experiments(data, by: str | None, read_options=None) -> list[tuple[str, Any, int | None]]:
    """(id, source, episode) for each experiment; source is a Dataset or a path."""
    if isinstance(data, xr.Dataset) or isinstance(data, str | os.PathLike):
        data = [data]
        by = by or "episode"
    data = list(data)
    by = by or "dataset"
    if by not in ("dataset", "episode"):
        raise SysIdError(f"by must be 'dataset' or 'episode', got {by!r}")
    sources = []
    for i, d in enumerate(data):
        if isinstance(d, xr.Dataset):
            sources.append((f"dataset{i}", d))
        else:
            for p in expand_paths(d):
                sources.append((p, p))
    exps = []
    for name, src in sources:
        if by == "dataset":
            exps.append((name, src, None))
            continue
        ds = src if isinstance(src, xr.Dataset) else load_dataset(src, read_options)
        n = int(ds.sizes.get("episode", 1))
        for e in range(n):
            exps.append((f"{name}#episode={e}", ds if isinstance(src, xr.Dataset) else src, e))
    ids = [e[0] for e in exps]
    if len(set(ids)) != len(ids):
        raise SysIdError("experiment ids are not unique (the same dataset is given twice)")
    return exps


def fit_one(model_spec, exp_id, source, episode, loss, fit_options, read_options=None) -> dict:
    """Run one fit of experiment ``exp_id`` (``source``: a dataset or a path; ``episode``: an index or None)
    and return its record; never raises: failures are returned as records with ``status='failed'``.

    ``fit_options`` go to :func:`pydso.problems.sysid.fit`, except ``seed`` (an int: the key of a multi-start)
    and ``validation`` (a dataset or path: the fit is scored on it, ``x0="estimate"``, giving ``val_rmse``,
    ``val_nrmse``, ``val_fit_percent``; ``validation_n_init``: samples for its initial state)."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"id": exp_id, "status": "failed", "error": ""}
    try:
        import jax

        from pydso.problems.sysid import fit

        opts = dict(fit_options or {})
        val = opts.pop("validation", None)
        n_init = opts.pop("validation_n_init", None)
        if "seed" in opts:
            opts["key"] = jax.random.PRNGKey(int(opts.pop("seed")))
        model = load_model(model_spec)
        ds = source if isinstance(source, xr.Dataset) else load_dataset(source, read_options)
        if episode is not None:
            ds = ds.isel(episode=[episode])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recorded in the result
            r = fit(model, ds, loss=loss, **opts)
        if val is not None:
            vds = val if isinstance(val, xr.Dataset) else load_dataset(val, read_options)
            sc = r.score(vds, n_init=n_init)
            rec.update(
                val_rmse=np.asarray(sc.rmse, float),
                val_nrmse=np.asarray(sc.nrmse, float),
                val_fit_percent=np.asarray(sc.fit_percent, float),
            )
        rec.update(
            status="ok" if r.converged else "not_converged",
            error="" if r.converged else r.message,
            names=list(r.names),
            estimate=np.asarray(r.estimate, float),
            stderr=np.asarray(r.stderr, float),
            ci_low=np.asarray(r.ci_low, float),
            ci_high=np.asarray(r.ci_high, float),
            rmse=np.asarray(r.rmse, float),
            nrmse=np.asarray(r.nrmse, float),
            fit_percent=np.asarray(r.fit_percent, float),
            cost=float(r.cost),
            n_steps=int(r.n_steps),
        )
    except Exception as e:  # noqa: BLE001 - recorded, the batch goes on
        msg = f"{type(e).__name__}: {e}"
        if not isinstance(e, ValueError | RuntimeError | FileNotFoundError):
            msg += " | " + traceback.format_exc(limit=3).replace("\n", " ")[-500:]
        rec["error"] = msg
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def _fit_joint_task(model_spec, exps, loss, shared, fit_options, read_options=None):
    """Run one joint fit over all experiments; never raises: returns ``(dataset or None, error message)``."""
    try:
        from pydso.problems.sysid import fit_joint

        model = load_model(model_spec)
        datasets = []
        for _, src, ep in exps:
            ds = src if isinstance(src, xr.Dataset) else load_dataset(src, read_options)
            datasets.append(ds.isel(episode=[ep]) if ep is not None else ds)
        r = fit_joint(
            model, datasets, shared=shared, loss=loss, experiment_ids=[e[0] for e in exps], **(fit_options or {})
        )
        return r.to_dataset(), ""
    except Exception as e:  # noqa: BLE001 - recorded for every experiment
        msg = f"{type(e).__name__}: {e}"
        if not isinstance(e, ValueError | RuntimeError | FileNotFoundError):
            msg += " | " + traceback.format_exc(limit=3).replace("\n", " ")[-500:]
        return None, msg


def _records_to_dataset(records: list[dict], attrs: dict) -> xr.Dataset:
    names: list[str] = []
    for r in records:
        for n in r.get("names", []):
            if n not in names:
                names.append(n)
    ny = max([len(r["rmse"]) for r in records if "rmse" in r] or [0])
    E, P = len(records), len(names)
    arr = {k: np.full((E, P), np.nan) for k in ("estimate", "stderr", "ci_low", "ci_high")}
    mkeys = ["rmse", "nrmse", "fit_percent"]
    if any("val_rmse" in r for r in records):
        mkeys += ["val_rmse", "val_nrmse", "val_fit_percent"]
    met = {k: np.full((E, ny), np.nan) for k in mkeys}
    cost, steps, wall = np.full(E, np.nan), np.full(E, -1, dtype=np.int64), np.full(E, np.nan)
    for i, r in enumerate(records):
        if "names" in r:
            idx = [names.index(n) for n in r["names"]]
            for k in arr:
                arr[k][i, idx] = r[k]
            for k in met:
                if k in r:
                    met[k][i, : len(r[k])] = r[k]
            cost[i], steps[i] = r["cost"], r["n_steps"]
        wall[i] = r.get("wall_s", np.nan)
    data = {k: (("experiment", "parameter"), v) for k, v in arr.items()}
    data.update({k: (("experiment", "output_dim"), v) for k, v in met.items()})
    data.update(
        cost=("experiment", cost),
        n_steps=("experiment", steps),
        wall_s=("experiment", wall),
        status=("experiment", np.array([r["status"] for r in records], dtype=str)),
        error=("experiment", np.array([r["error"] for r in records], dtype=str)),
    )
    return xr.Dataset(
        data,
        coords={
            "experiment": np.array([r["id"] for r in records], dtype=str),
            "parameter": np.array(names, dtype=str),
        },
        attrs=attrs,
    )


def _dataset_to_records(ds: xr.Dataset) -> list[dict]:
    recs = []
    names = [str(n) for n in ds["parameter"].values]
    for i, eid in enumerate(ds["experiment"].values):
        r = {"id": str(eid), "status": str(ds["status"].values[i]), "error": str(ds["error"].values[i])}
        est = ds["estimate"].values[i]
        have = ~np.isnan(est)
        if have.any():
            r["names"] = [n for n, h in zip(names, have, strict=True) if h]
            for k in ("estimate", "stderr", "ci_low", "ci_high"):
                r[k] = ds[k].values[i][have]
            for k in ("rmse", "nrmse", "fit_percent", "val_rmse", "val_nrmse", "val_fit_percent"):
                if k in ds:
                    r[k] = ds[k].values[i]
            r["cost"], r["n_steps"] = float(ds["cost"].values[i]), int(ds["n_steps"].values[i])
        r["wall_s"] = float(ds["wall_s"].values[i])
        recs.append(r)
    return recs


def is_results_store(path) -> bool:
    """True if ``path`` is a zarr store whose attributes carry ``created_by`` = :data:`RESULTS_MARKER` (a results
    store written by :func:`write_results`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    for meta, get in ((".zattrs", lambda d: d), ("zarr.json", lambda d: d.get("attributes", {}))):
        f = os.path.join(path, meta)
        if os.path.isfile(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    attrs = get(json.load(fh))
            except (OSError, ValueError, AttributeError):
                return False
            return isinstance(attrs, dict) and attrs.get("created_by") == RESULTS_MARKER
    return False


def check_results_path(out) -> None:
    """Raise :class:`SysIdError` if ``out`` exists but is not a pydso results store (pydso never replaces, moves or
    deletes anything it did not create)."""
    out = os.fspath(out)
    if os.path.lexists(out) and not is_results_store(out):
        kind = "a directory" if os.path.isdir(out) else "a file" if os.path.isfile(out) else "a path"
        raise SysIdError(
            f"results path {out!r} exists and is {kind} that is not a pydso results store (no created_by="
            f"{RESULTS_MARKER!r} attribute); pydso does not overwrite it: choose another output path or remove it "
            "yourself"
        )


def write_results(ds: xr.Dataset, out) -> None:
    """Write the results dataset ``ds`` to the zarr store ``out`` crash-safely: into a fresh temporary store beside
    it, then swapped in (the previous version is moved aside under a unique name and removed after the swap; a
    crash in between is repaired by :func:`open_results`). The store is marked ``created_by`` =
    :data:`RESULTS_MARKER`; an ``out`` that exists but is not such a store is refused with :class:`SysIdError`."""
    out = os.path.abspath(os.fspath(out))
    check_results_path(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    ds = ds.copy()
    ds.attrs = {**ds.attrs, "created_by": RESULTS_MARKER}
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)
        old = None
        if os.path.lexists(out):
            old = f"{out}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    if old is not None:
        shutil.rmtree(old)


def _recover(out: str) -> None:
    """Finish an interrupted :func:`write_results`: if ``out`` is missing but its previous version was moved aside,
    put that version back, so a crash during the swap never loses finished results. Only pydso results stores
    are considered."""
    if os.path.lexists(out):
        return
    parent = os.path.dirname(os.path.abspath(out)) or "."
    name = os.path.basename(os.path.abspath(out))
    if not os.path.isdir(parent):
        return
    old = sorted(
        (
            os.path.join(parent, f)
            for f in os.listdir(parent)
            if f.startswith(f"{name}.old-") and is_results_store(os.path.join(parent, f))
        ),
        key=os.path.getmtime,
    )
    if old:
        os.replace(old[-1], out)


def open_results(out) -> xr.Dataset:
    """Open a results store written by :func:`fit_many` (recovering it if a save was interrupted)."""
    out = os.fspath(out)
    _recover(out)
    if not os.path.lexists(out):
        raise FileNotFoundError(f"no results store at {out!r}")
    check_results_path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(out).load()


def fit_many(
    model,
    datasets_or_paths,
    *,
    loss="simulation",
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    processes: bool = False,
    out: str | None = None,
    resume: bool = True,
    retry_failed: bool = False,
    by: str | None = None,
    fit_options: dict | None = None,
    progress: bool | None = None,
    checkpoint_every: int = 50,
    on_result: Callable[[dict], None] | None = None,
    joint: bool = False,
    shared: Sequence[str] | str | None = None,
    read_options: dict | None = None,
) -> xr.Dataset:
    """Fit ``model`` to every experiment, on Dask; return (and save to ``out``) the results dataset.

    **Arguments:**

    - ``model``: a sysid model (:class:`~pydso.problems.sysid.ContinuousModel` / ``DiscreteModel``), a
      zero-argument factory returning one, or ``'module:factory'`` (imported on each worker; preferred for
      process clusters).
    - ``datasets_or_paths``: a dataset or store path (each **episode** is then one experiment), or a list of
      datasets / paths / glob patterns (each **dataset** is one experiment, its episodes fitted jointly with
      one initial state each). ``by='episode'|'dataset'`` overrides.
    - ``loss``: as for :func:`pydso.problems.sysid.fit`; ``fit_options``: further keywords of ``fit``.
    - ``client``: a ``dask.distributed.Client`` to use; ``scheduler``: the address of a running scheduler
      (``tcp://host:8786``); neither: a local cluster is started and closed here — in-process threads
      (``processes=False``, default; ``n_workers`` threads, default 1) or ``n_workers`` single-threaded
      worker processes (``processes=True``).
    - ``out``: zarr store for the results, rewritten every ``checkpoint_every`` results and at the end;
      ``resume``: skip the experiments already in ``out`` (``retry_failed=True`` re-runs failed ones; failures
      kept from an earlier run are listed in ``attrs['stale_failed']`` and warned about).
    - ``read_options``: how to read CSV / NPZ / MAT paths (:func:`load_dataset`: ``columns``, ``dt``, ...).
    - ``progress``: tqdm bar (default: only on a terminal); ``on_result``: called with each record.
    - ``joint=True``: one joint fit of all experiments (:func:`pydso.problems.sysid.fit_joint`) with the
      parameters named in ``shared`` (names or a comma-separated string) common to all of them; it is one
      optimisation and runs as a single Dask task (see the module documentation for the results layout).
      ``resume`` then skips the fit if ``out`` holds a joint result for the same experiments and ``shared``.
    """
    from dask.distributed import as_completed

    from ..._progress import progress_bar

    if isinstance(shared, str):
        shared = [p.strip() for p in shared.split(",") if p.strip()]
    shared = list(shared or [])
    if shared and not joint:
        raise SysIdError(f"shared={shared!r} needs joint=True (shared parameters only exist in a joint fit)")
    exps = _experiments(datasets_or_paths, by, read_options)
    if joint:
        return _fit_many_joint(
            model,
            exps,
            loss,
            shared,
            client,
            scheduler,
            n_workers,
            processes,
            out,
            resume,
            retry_failed,
            fit_options,
            progress,
            on_result,
            read_options,
        )
    done: dict[str, dict] = {}
    if out is not None:
        check_results_path(out)
        _recover(out)
    if out is not None and resume and os.path.exists(out):
        for r in _dataset_to_records(open_results(out)):
            if r["status"] != "failed" or not retry_failed:
                done[r["id"]] = r
    todo = [e for e in exps if e[0] not in done]
    attrs = {
        "loss": str(loss),
        "model": model if isinstance(model, str) else getattr(load_model(model), "name", type(model).__name__),
        "created_by": RESULTS_MARKER,
    }
    records = dict(done)
    own = None
    try:
        if todo:
            if client is None:
                client = own = _start_client(scheduler, processes, n_workers)
            mspec = model if isinstance(model, str) else load_model(model)
            if not isinstance(mspec, str):
                [mspec] = client.scatter([mspec], broadcast=True, hash=False)
            futures = {}
            for eid, src, ep in todo:
                if isinstance(src, xr.Dataset) and ep is not None:
                    src, ep = src.isel(episode=[ep]), None
                fut = client.submit(fit_one, mspec, eid, src, ep, loss, fit_options, read_options, pure=False)
                futures[fut] = eid
            bar = progress_bar(total=len(futures), desc="sysid fits", enable=progress)
            n_new = 0
            for fut in as_completed(list(futures)):
                eid = futures[fut]
                try:
                    rec = fut.result()
                except Exception as e:  # noqa: BLE001 - e.g. a worker died
                    rec = {"id": eid, "status": "failed", "error": f"{type(e).__name__}: {e}", "wall_s": np.nan}
                records[eid] = rec
                if on_result is not None:
                    on_result(rec)
                bar.update(1)
                bar.set_postfix(failed=sum(r["status"] == "failed" for r in records.values()))
                n_new += 1
                if out is not None and n_new % checkpoint_every == 0:
                    write_results(_records_to_dataset([records[e[0]] for e in exps if e[0] in records], attrs), out)
            bar.close()
    finally:
        _close_client(own)
    ordered = [records[e[0]] for e in exps if e[0] in records]
    result = _records_to_dataset(ordered, attrs)
    if out is not None:
        write_results(result, out)
    stale = [eid for eid, r in done.items() if r["status"] == "failed"]
    if stale:
        result.attrs["stale_failed"] = stale
        warnings.warn(
            f"{len(stale)} experiment(s) failed in an earlier run on {out!r} and were not re-run (their recorded "
            f"errors are shown again): {stale[:5]}; to re-run them (e.g. after fixing the model) pass "
            "retry_failed=True (CLI: --retry-failed), or resume=False / --no-resume to re-run everything",
            SysIdWarning,
            stacklevel=2,
        )
    return result


def _start_client(scheduler, processes, n_workers):
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        return Client(scheduler)
    if processes:
        cluster = LocalCluster(n_workers=n_workers or 1, threads_per_worker=1, processes=True, dashboard_address=":0")
        return Client(cluster)
    return Client(processes=False, n_workers=1, threads_per_worker=n_workers or 1, dashboard_address=":0")


def _close_client(own) -> None:
    if own is not None:
        cluster = getattr(own, "cluster", None)
        own.close()
        if cluster is not None:
            cluster.close()


def _fit_many_joint(
    model,
    exps,
    loss,
    shared,
    client,
    scheduler,
    n_workers,
    processes,
    out,
    resume,
    retry_failed,
    fit_options,
    progress,
    on_result,
    read_options=None,
) -> xr.Dataset:
    """``fit_many(..., joint=True)``: one joint fit of all experiments as a single Dask task."""
    from ..._progress import progress_bar

    ids = [e[0] for e in exps]
    if out is not None:
        check_results_path(out)
        _recover(out)
    if out is not None and resume and os.path.exists(out):
        stored = open_results(out)
        same = (
            bool(stored.attrs.get("joint"))
            and [str(e) for e in stored["experiment"].values] == ids
            and list(stored.attrs.get("shared_requested", [])) == shared
        )
        failed = bool((stored["status"].values == "failed").all())
        if same and not (failed and retry_failed):
            return stored
    attrs = {
        "loss": str(loss),
        "model": model if isinstance(model, str) else getattr(load_model(model), "name", type(model).__name__),
        "created_by": RESULTS_MARKER,
        "joint": True,
        "shared_requested": list(shared),
    }
    t0 = time.perf_counter()
    own = None
    try:
        if client is None:
            client = own = _start_client(scheduler, processes, n_workers)
        mspec = model if isinstance(model, str) else load_model(model)
        srcs = [
            (eid, src.isel(episode=[ep]), None) if isinstance(src, xr.Dataset) and ep is not None else (eid, src, ep)
            for eid, src, ep in exps
        ]
        bar = progress_bar(total=1, desc="sysid joint fit", enable=progress)
        fut = client.submit(_fit_joint_task, mspec, srcs, loss, shared, fit_options, read_options, pure=False)
        try:
            result, err = fut.result()
        except Exception as e:  # noqa: BLE001 - e.g. the worker died
            result, err = None, f"{type(e).__name__}: {e}"
        bar.update(1)
        bar.close()
    finally:
        _close_client(own)
    wall = time.perf_counter() - t0
    if result is None:
        recs = [{"id": eid, "status": "failed", "error": err, "wall_s": wall} for eid in ids]
        result = _records_to_dataset(recs, {})
    else:
        result["wall_s"] = ("experiment", np.full(len(ids), wall))
    result.attrs = {**result.attrs, **attrs}
    if on_result is not None:
        for rec in _dataset_to_records(result):
            on_result(rec)
    if out is not None:
        write_results(result, out)
    return result
