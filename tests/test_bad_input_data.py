"""Bad input to ``pydso.data`` gets a :class:`pydso.DatasetError` whose message names the offending argument (variable,
attribute, path or option) — never an ``AttributeError``, a ``RecursionError``, a zarr/codec or an OS traceback."""

import json
import os
import warnings

import numpy as np
import pytest
import xarray as xr

from pydso import data
from pydso.data import DatasetError

N, T, D = 3, 4, 2


def _state():
    return np.arange(N * T * D, dtype=float).reshape(N, T, D)


def _ds(**kwargs):
    return data.make_dataset(_state(), **kwargs)


def _store(tmp_path, name="s", **kwargs):
    path = tmp_path / name
    data.save(_ds(**kwargs), path)
    return path


def _nan_at(a, index):
    a = np.array(a, dtype=float)
    a[index] = np.nan
    return a


def _mask(rows):
    return np.array(rows, dtype=bool)


# Each case: (id, function of tmp_path that must raise, regex the message must match). The regexes name the argument.
CASES = [
    ("state-2d", lambda p: data.make_dataset(np.ones((3, 4))), r"variable 'state' must have 3 dimensions"),
    ("state-strings", lambda p: data.make_dataset(np.full((2, 3, 1), "a")), r"variable 'state' has dtype"),
    ("cost-shape", lambda p: _ds(cost=np.ones((N, T + 1))), r"variable 'cost' has shape .* does not match 'state'"),
    ("cost-ndim", lambda p: _ds(cost=np.ones((N, T, 1))), r"variable 'cost' must have 2 dimensions"),
    ("input-shape", lambda p: _ds(input=np.ones((N + 1, T, 1))), r"variable 'input' has shape"),
    ("mask-dtype", lambda p: _ds(mask=np.ones((N, T), int)), r"variable 'mask' has dtype int64; expected bool"),
    ("cost-int", lambda p: _ds(cost=np.ones((N, T), int)), r"variable 'cost' has dtype int64; expected a float"),
    ("time-shape", lambda p: _ds(time=np.arange(T + 1.0)), r"coordinate 'time' has shape \(5,\); expected \(4,\)"),
    ("time-order", lambda p: _ds(time=np.array([0.0, 2.0, 1.0, 3.0])), r"coordinate 'time' is not strictly increasing"),
    ("time-nan", lambda p: _ds(time=np.array([0.0, np.nan, 1.0, 3.0])), r"coordinate 'time' contains non-finite"),
    ("parameters-object", lambda p: _ds(parameters=object()), r"parameters: cannot store a object as JSON"),
    ("parameters-json", lambda p: _ds(parameters="{not json"), r"parameters: a string must be valid JSON"),
    ("dt-negative", lambda p: _ds(dt=-0.1), r"dt must be a positive finite number .*got -0.1"),
    ("dt-nan", lambda p: _ds(dt=float("nan")), r"dt must be a positive finite number .*got nan"),
    (
        "units-unknown",
        lambda p: _ds(units={"speed": "m/s"}),
        r"attribute 'units' names unknown variable\(s\) \['speed'\]",
    ),
    ("units-type", lambda p: _ds(attrs={"units": {"state": "m"}}), r"attribute 'units' must be a JSON string"),
    ("system-type", lambda p: _ds(attrs={"system": 3}), r"attribute 'system' must be a string"),
    ("no-episodes", lambda p: data.make_dataset(np.ones((0, 4, 2))), r"dimension 'episode' has size 0"),
    (
        "state-nan-middle",
        lambda p: data.make_dataset(_nan_at(_state(), (1, 1, 0))),
        r"variable 'state' has NaN/inf at episode 1, time index 1",
    ),
    (
        "state-nan-tail",
        lambda p: data.make_dataset(_nan_at(_state(), (2, slice(2, None)))),
        r"variable 'state' ends in NaN in episode\(s\) \[2\].*add a boolean variable 'mask'",
    ),
    (
        "mask-first",
        lambda p: _ds(mask=_mask([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])),
        r"variable 'mask' is False at time index 0 of episode 1",
    ),
    (
        "mask-gap",
        lambda p: _ds(mask=_mask([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]])),
        r"variable 'mask' of episode 1 is not of the form True...True False...False",
    ),
    (
        "cost-nan-step",
        lambda p: _ds(cost=_nan_at(np.ones((N, T)), (0, 1))),
        r"variable 'cost' has NaN/inf at episode 0, time index 1, a recorded step",
    ),
    (
        "terminal-inf",
        lambda p: _ds(terminal_cost=np.array([0.0, np.inf, 1.0])),
        r"variable 'terminal_cost' has NaN/inf at episode 1",
    ),
    ("validate-array", lambda p: data.validate(np.ones((2, 3, 1))), r"expected an xarray.Dataset, got ndarray"),
    (
        "validate-no-version",
        lambda p: data.validate(
            xr.Dataset({"state": (("episode", "time", "state_dim"), _state())}, {"time": np.arange(T)})
        ),
        r"attribute 'pydso_schema_version' is missing",
    ),
    (
        "validate-version",
        lambda p: data.validate(_ds().assign_attrs(pydso_schema_version=2)),
        r"attribute 'pydso_schema_version' is 2",
    ),
    (
        "validate-transposed",
        lambda p: data.validate(_ds().transpose("time", "episode", "state_dim")),
        r"variable 'state' has dims \('time', 'episode', 'state_dim'\).*transpose",
    ),
    (
        "save-array",
        lambda p: data.save(_state(), p / "s"),
        r"save: ds must be an xarray.Dataset of the pydso schema, got ndarray",
    ),
    (
        "append-array",
        lambda p: data.append(p / "s", _state()),
        r"append: ds must be an xarray.Dataset of the pydso schema, got ndarray",
    ),
    (
        "append-array-existing",
        lambda p: data.append(_store(p), _state()),
        r"append: ds must be an xarray.Dataset of the pydso schema, got ndarray",
    ),
    ("save-exists", lambda p: data.save(_ds(), _store(p)), r"a store already exists at .*pass overwrite=True"),
    (
        "save-overwrite-foreign",
        lambda p: (
            os.mkdir(p / "mine"),
            (p / "mine" / "x.txt").write_text("x"),
            data.save(_ds(), p / "mine", overwrite=True),
        ),
        r"refusing to overwrite .*mine.*not a pydso trajectory store",
    ),
    (
        "save-onto-file",
        lambda p: ((p / "f").write_text("x"), data.save(_ds(), p / "f")),
        r"save: path: .*/f' is a file, not a directory",
    ),
    (
        "save-below-file",
        lambda p: ((p / "f").write_text("x"), data.save(_ds(), p / "f" / "s")),
        r"save: path: cannot create .*/f' is a file, not a directory",
    ),
    ("save-path-type", lambda p: data.save(_ds(), 123), r"save: path must be a str or os.PathLike"),
    (
        "append-onto-file",
        lambda p: ((p / "f").write_text("x"), data.append(p / "f", _ds())),
        r"append: path: .*/f' is a file, not a directory",
    ),
    (
        "append-empty-dir",
        lambda p: (os.mkdir(p / "e"), data.append(p / "e", _ds())),
        r"/e' is not a zarr store \(no pydso.json manifest",
    ),
    ("open-missing", lambda p: data.open(p / "nope"), r"no trajectory store at .*nope.*does not exist"),
    (
        "open-file",
        lambda p: ((p / "f").write_text("x"), data.open(p / "f")),
        r"/f' is a file, not a pydso trajectory store",
    ),
    ("open-path-type", lambda p: data.open(None), r"path must be a str or os.PathLike"),
    (
        "open-chunks-zero",
        lambda p: data.open(_store(p), chunks=0),
        r"chunks must be a positive number of episodes, got 0",
    ),
    ("open-chunks-str", lambda p: data.open(_store(p), chunks="big"), r'chunks must be "auto", an integer, a mapping'),
    ("validate-missing-path", lambda p: data.validate(p / "nope"), r"no trajectory store at .*nope"),
    (
        "iter-chunks-zero",
        lambda p: list(data.iter_chunks(_ds(), episodes_per_chunk=0)),
        r"episodes_per_chunk must be a positive integer, got 0",
    ),
    (
        "save-chunk-negative",
        lambda p: data.save(_ds(), p / "s", episodes_per_chunk=-1),
        r"episodes_per_chunk must be a positive integer, got -1",
    ),
    (
        "append-dt-differs",
        lambda p: data.append(_store(p, dt=0.1), _ds(dt=0.2)),
        r"cannot append to .*attribute 'dt' differs: store has 0.1, new data has 0.2",
    ),
    (
        "append-state-dim",
        lambda p: data.append(_store(p), data.make_dataset(np.ones((2, T, 3)))),
        r"cannot append to .*variable 'state': dimension 'state_dim' has size 3, the store 2",
    ),
    (
        "manifest-garbage",
        lambda p: ((_store(p) / "pydso.json").write_text("{]"), data.open(p / "s")),
        r"manifest pydso.json is not valid JSON",
    ),
    (
        "manifest-version",
        lambda p: (_bump_store_version(_store(p)), data.open(p / "s")),
        r"has store_version 99; this pydso reads version 1",
    ),
]


def _bump_store_version(path):
    manifest = json.loads((path / "pydso.json").read_text())
    manifest["store_version"] = 99
    (path / "pydso.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("make, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_data_input_is_a_dataset_error_naming_the_argument(tmp_path, make, match):
    with pytest.raises(DatasetError, match=match):
        make(tmp_path)


def test_unwritable_store_directory_is_refused_before_writing(tmp_path, monkeypatch):
    # The test may run as root (os.access is then always True): deny access to one directory the way the OS would.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(locked) else real_access(p, mode))
    with pytest.raises(
        DatasetError, match=r"save: path: cannot create .*no permission to write in the directory .*locked"
    ):
        data.save(_ds(), locked / "s")
    assert list(locked.iterdir()) == []


def test_store_without_checksums_still_opens_with_a_warning(tmp_path):
    path = _store(tmp_path)
    manifest = json.loads((path / "pydso.json").read_text())
    for part in manifest["parts"]:  # what an older pydso wrote
        del part["files"], part["variables"]
    (path / "pydso.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"written by an older pydso without checksums"):
        opened = data.open(path)
    xr.testing.assert_identical(opened.load(), _ds())


def test_store_with_checksums_opens_without_warning_and_validates(tmp_path):
    path = _store(tmp_path, cost=np.ones((N, T)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.testing.assert_identical(data.validate(path).load(), _ds(cost=np.ones((N, T))))
