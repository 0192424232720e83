"""Batch runs over many datasets on Dask: one system-identification fit per experiment.

:func:`fit_many` runs :func:`pydso.problems.sysid.fit` once per experiment on a Dask cluster — an in-process
cluster by default (threads: the JAX compilation is then shared by all tasks), a ``LocalCluster`` of processes
when ``processes=True``, or any running cluster given by ``scheduler=ADDRESS`` or ``client=``. Each worker
compiles the fit once per model and data shape and reuses it for every later experiment of that shape.

Results come back as an ``xarray.Dataset`` (experiment x parameter: ``estimate``, ``stderr``, ``ci_low``,
``ci_high``; experiment x output_dim: ``rmse``, ``nrmse``, ``fit_percent``; per experiment ``status``
(``ok`` / ``not_converged`` / ``failed``), ``error``, ``cost``, ``n_steps``, ``wall_s``), written to zarr at
``out`` as the batch proceeds. A failing experiment (bad data, diverging solve) is recorded with its error and
the batch goes on; re-running with the same ``out`` skips the experiments already recorded (``resume=True``).

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
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["fit_many", "load_model", "expand_paths"]

_MODEL_CACHE: dict[str, Any] = {}


def load_model(spec):
    """A model from ``'module:factory'`` (the factory is called without arguments; cached per process), a
    zero-argument callable returning a model, or a model itself."""
    if isinstance(spec, str):
        if spec in _MODEL_CACHE:
            return _MODEL_CACHE[spec]
        if ":" not in spec:
            raise ValueError(f"model {spec!r} must be given as 'module:factory'")
        mod_name, attr = spec.split(":", 1)
        if mod_name.endswith(".py") or os.sep in mod_name:
            import importlib.util

            path = os.path.abspath(mod_name)
            sp = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
            if sp is None or sp.loader is None:
                raise ValueError(f"cannot import model file {mod_name!r}")
            module = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
        if not hasattr(module, attr):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (model factory)")
        obj = getattr(module, attr)
        model = obj() if callable(obj) and not hasattr(obj, "n_states") else obj
        _MODEL_CACHE[spec] = model
        return model
    if callable(spec) and not hasattr(spec, "n_states"):
        return spec()
    return spec


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
        raise ValueError(f"dataset {path!r} is neither a pydso store nor a readable zarr store: {e}") from None


def _experiments(data, by: str | None) -> list[tuple[str, Any, int | None]]:
    """(id, source, episode) for each experiment; source is a Dataset or a path."""
    if isinstance(data, xr.Dataset) or isinstance(data, str | os.PathLike):
        data = [data]
        by = by or "episode"
    data = list(data)
    by = by or "dataset"
    if by not in ("dataset", "episode"):
        raise ValueError(f"by must be 'dataset' or 'episode', got {by!r}")
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
        ds = src if isinstance(src, xr.Dataset) else _load(src)
        n = int(ds.sizes.get("episode", 1))
        for e in range(n):
            exps.append((f"{name}#episode={e}", ds if isinstance(src, xr.Dataset) else src, e))
    ids = [e[0] for e in exps]
    if len(set(ids)) != len(ids):
        raise ValueError("experiment ids are not unique (the same dataset is given twice)")
    return exps


def _fit_one(model_spec, exp_id, source, episode, loss, fit_options) -> dict:
    """Run one fit; never raises: failures are returned as records."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"id": exp_id, "status": "failed", "error": ""}
    try:
        from pydso.problems.sysid import fit

        model = load_model(model_spec)
        ds = source if isinstance(source, xr.Dataset) else _load(source)
        if episode is not None:
            ds = ds.isel(episode=[episode])
        r = fit(model, ds, loss=loss, **(fit_options or {}))
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


def _fit_joint_task(model_spec, exps, loss, shared, fit_options):
    """Run one joint fit over all experiments; never raises: returns ``(dataset or None, error message)``."""
    try:
        from pydso.problems.sysid import fit_joint

        model = load_model(model_spec)
        datasets = []
        for _, src, ep in exps:
            ds = src if isinstance(src, xr.Dataset) else _load(src)
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
    met = {k: np.full((E, ny), np.nan) for k in ("rmse", "nrmse", "fit_percent")}
    cost, steps, wall = np.full(E, np.nan), np.full(E, -1, dtype=np.int64), np.full(E, np.nan)
    for i, r in enumerate(records):
        if "names" in r:
            idx = [names.index(n) for n in r["names"]]
            for k in arr:
                arr[k][i, idx] = r[k]
            for k in met:
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
            for k in ("rmse", "nrmse", "fit_percent"):
                r[k] = ds[k].values[i]
            r["cost"], r["n_steps"] = float(ds["cost"].values[i]), int(ds["n_steps"].values[i])
        r["wall_s"] = float(ds["wall_s"].values[i])
        recs.append(r)
    return recs


def _save(ds: xr.Dataset, out: str) -> None:
    """Write atomically: to a temporary store, then swap it in."""
    tmp = f"{out}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)
    old = f"{out}.old-{os.getpid()}"
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    if os.path.exists(old):
        shutil.rmtree(old)


def _recover(out: str) -> None:
    """Finish an interrupted :func:`_save`: if ``out`` is missing but its previous version was moved aside,
    put that version back, so a crash during the swap never loses finished results."""
    if os.path.exists(out):
        return
    parent = os.path.dirname(os.path.abspath(out)) or "."
    name = os.path.basename(os.path.abspath(out))
    old = sorted(
        (os.path.join(parent, f) for f in os.listdir(parent) if f.startswith(f"{name}.old-")), key=os.path.getmtime
    )
    if old:
        os.replace(old[-1], out)


def open_results(out: str) -> xr.Dataset:
    """Open a results store written by :func:`fit_many` (recovering it if a save was interrupted)."""
    _recover(out)
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
      ``resume``: skip the experiments already in ``out`` (``retry_failed=True`` re-runs failed ones).
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
        raise ValueError(f"shared={shared!r} needs joint=True (shared parameters only exist in a joint fit)")
    exps = _experiments(datasets_or_paths, by)
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
        )
    done: dict[str, dict] = {}
    if out is not None:
        _recover(out)
    if out is not None and resume and os.path.exists(out):
        for r in _dataset_to_records(open_results(out)):
            if r["status"] != "failed" or not retry_failed:
                done[r["id"]] = r
    todo = [e for e in exps if e[0] not in done]
    attrs = {
        "loss": str(loss),
        "model": model if isinstance(model, str) else getattr(load_model(model), "name", type(model).__name__),
        "created_by": "pydso.problems.sysid.fit_many",
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
                fut = client.submit(_fit_one, mspec, eid, src, ep, loss, fit_options, pure=False)
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
                    _save(_records_to_dataset([records[e[0]] for e in exps if e[0] in records], attrs), out)
            bar.close()
    finally:
        _close_client(own)
    ordered = [records[e[0]] for e in exps if e[0] in records]
    result = _records_to_dataset(ordered, attrs)
    if out is not None:
        _save(result, out)
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
) -> xr.Dataset:
    """``fit_many(..., joint=True)``: one joint fit of all experiments as a single Dask task."""
    from ..._progress import progress_bar

    ids = [e[0] for e in exps]
    if out is not None:
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
        "created_by": "pydso.problems.sysid.fit_many",
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
        fut = client.submit(_fit_joint_task, mspec, srcs, loss, shared, fit_options, pure=False)
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
        _save(result, out)
    return result
