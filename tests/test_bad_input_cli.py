"""Bad command lines of ``pydso improve`` / ``pydso inspect`` get a pydso error naming the option — raised before any
work is done (an unwritable ``--out`` is refused before the improvement runs) — and ``pydso`` exits with status 2
and a one-line message instead of a traceback."""

import os
import textwrap

import numpy as np
import pytest

import pydso
from pydso import data
from pydso.cli import build_parser, main

MODEL = textwrap.dedent(
    """
    import jax.numpy as jnp
    import pydso

    def factory():
        problem = pydso.Problem(
            pydso.GaussianChain(lambda x, th: th["a"] @ x, 0.1),
            lambda x, th: x @ x,
            pydso.Episodic(0.9, 4),
            pydso.Normal(jnp.zeros(2), 1.0),
        )
        return problem, {"a": 0.5 * jnp.eye(2)}

    def broken():
        raise RuntimeError("no such plant")

    def wrong():
        return 42

    not_callable = 3
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    (tmp_path / "model.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    blp = np.full((4, 5), -1.0)
    blp[:, -1] = np.nan
    data.save(data.make_dataset(rng.normal(size=(4, 5, 2)), behavior_logp=blp), tmp_path / "store")
    data.save(data.make_dataset(rng.normal(size=(4, 5, 2))), tmp_path / "nolog")
    np.savez(tmp_path / "theta.npz", 0.5 * np.eye(2))
    np.savez(tmp_path / "nan.npz", np.full((2, 2), np.nan))
    np.savez(tmp_path / "shape.npz", np.eye(3))
    np.savez(tmp_path / "names.npz", w=np.eye(2))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    return tmp_path


def improve(p, *extra, out="out.npz", problem="model.py:factory", theta="theta.npz", store="store"):
    argv = [
        "improve",
        "--data",
        str(p / store),
        "--problem",
        str(p / problem) if problem.startswith("model.py") else problem,
    ]
    argv += ["--theta", str(p / theta), "--out", str(p / out), *extra]
    return argv


# (id, argv builder, exception type, regex naming the option)
CASES = [
    (
        "iterations-negative",
        lambda p: improve(p, "--iterations", "-1"),
        pydso.ProblemError,
        r"--iterations must be a positive integer, got -1",
    ),
    (
        "iterations-zero",
        lambda p: improve(p, "--iterations", "0"),
        pydso.ProblemError,
        r"--iterations must be a positive integer, got 0",
    ),
    (
        "minibatch-zero",
        lambda p: improve(p, "--minibatch", "0"),
        pydso.ProblemError,
        r"--minibatch must be a positive integer, got 0",
    ),
    (
        "chunk-zero",
        lambda p: improve(p, "--episodes-per-chunk", "0"),
        pydso.ProblemError,
        r"--episodes-per-chunk must be a positive integer",
    ),
    (
        "lr-negative",
        lambda p: improve(p, "--learning-rate", "-0.1"),
        pydso.ProblemError,
        r"--learning-rate must be a positive finite number",
    ),
    (
        "lr-nan",
        lambda p: improve(p, "--learning-rate", "nan"),
        pydso.ProblemError,
        r"--learning-rate must be a positive finite number",
    ),
    ("out-directory", lambda p: improve(p, out="adir"), pydso.ProblemError, r"--out: .*adir' is a directory"),
    (
        "out-below-file",
        lambda p: improve(p, out="afile/theta.npz"),
        pydso.ProblemError,
        r"--out: cannot write .*afile' is a file",
    ),
    ("data-missing", lambda p: improve(p, store="nothere"), FileNotFoundError, r"--data: no such store .*nothere"),
    (
        "data-file",
        lambda p: improve(p, store="afile"),
        pydso.DatasetError,
        r"--data: .*afile' is a file, not a pydso trajectory store",
    ),
    (
        "data-no-logp",
        lambda p: improve(p, store="nolog"),
        pydso.DatasetError,
        r"--data: .*nolog' has no 'behavior_logp' variable",
    ),
    (
        "problem-no-colon",
        lambda p: improve(p, problem="model"),
        pydso.ProblemError,
        r"--problem must be 'package.module:name' or 'path/to/file.py:name'",
    ),
    (
        "problem-module",
        lambda p: improve(p, problem="no_such_pkg_xyz:factory"),
        pydso.ProblemError,
        r"--problem: cannot import module 'no_such_pkg_xyz'",
    ),
    (
        "problem-attribute",
        lambda p: improve(p, problem="model.py:missing"),
        pydso.ProblemError,
        r"--problem: .*model.py' has no attribute 'missing'",
    ),
    (
        "problem-not-callable",
        lambda p: improve(p, problem="model.py:not_callable"),
        pydso.ProblemError,
        r"--problem: .*not_callable' is not callable",
    ),
    (
        "problem-raises",
        lambda p: improve(p, problem="model.py:broken"),
        pydso.ProblemError,
        r"--problem: calling .*broken\(\) failed: RuntimeError: no such plant",
    ),
    (
        "problem-returns",
        lambda p: improve(p, problem="model.py:wrong"),
        pydso.ProblemError,
        r"--problem: .*wrong\(\) must return \(problem, theta_template\), got int",
    ),
    ("theta-missing", lambda p: improve(p, theta="none.npz"), FileNotFoundError, r"--theta: no such file"),
    ("theta-directory", lambda p: improve(p, theta="adir"), pydso.ProblemError, r"--theta: .*adir' is a directory"),
    (
        "theta-garbage",
        lambda p: improve(p, theta="garbage.npz"),
        pydso.ProblemError,
        r"--theta: .*garbage.npz' is not a readable .npz file",
    ),
    (
        "theta-shape",
        lambda p: improve(p, theta="shape.npz"),
        pydso.ProblemError,
        r"--theta: leaf \['a'\] has shape \(3, 3\), the template expects \(2, 2\)",
    ),
    (
        "theta-names",
        lambda p: improve(p, theta="names.npz"),
        pydso.ProblemError,
        r"--theta: .*has arrays \['w'\]; expected 1 leaves",
    ),
    (
        "theta-nan",
        lambda p: improve(p, theta="nan.npz"),
        pydso.ProblemError,
        r"theta\['a'\] contains non-finite values",
    ),
    (
        "inspect-half",
        lambda p: ["inspect", str(p / "store"), "--problem", str(p / "model.py") + ":factory"],
        pydso.ProblemError,
        r"--problem and --theta must be given together",
    ),
    (
        "inspect-missing",
        lambda p: ["inspect", str(p / "nothere")],
        pydso.DatasetError,
        r"no trajectory store at .*nothere",
    ),
    (
        "inspect-nan-theta",
        lambda p: [
            "inspect",
            str(p / "store"),
            "--problem",
            str(p / "model.py") + ":factory",
            "--theta",
            str(p / "nan.npz"),
        ],
        pydso.ProblemError,
        r"theta\['a'\] contains non-finite values",
    ),
]


@pytest.mark.parametrize("argv, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line_names_the_option(files, argv, error, match, capsys):
    args = build_parser().parse_args(argv(files))
    with pytest.raises(error, match=match):
        args.func(args)
    assert not (files / "out.npz").exists()
    # The same command through the entry point: exit status 2 and a one-line message naming the option.
    assert main(argv(files)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pydso {argv(files)[0]}: error:") and "Traceback" not in err


def test_unwritable_out_is_refused_before_the_work(files, monkeypatch):
    locked = files / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(locked) else real_access(p, mode))
    import pydso.optimize

    def must_not_run(*args, **kwargs):
        raise AssertionError("the improvement ran although --out cannot be written")

    monkeypatch.setattr(pydso.optimize, "minimize", must_not_run)
    args = build_parser().parse_args(improve(files, out="locked/theta.npz"))
    with pytest.raises(pydso.ProblemError, match=r"--out: cannot write .*no permission to write in the directory"):
        args.func(args)


def test_inspect_verify_names_a_damaged_chunk(tmp_path, capsys):
    path = tmp_path / "s"
    data.save(data.make_dataset(np.arange(24.0).reshape(3, 4, 2)), path, episodes_per_chunk=1)
    assert main(["inspect", str(path), "--verify"]) == 0
    assert "every file matches its checksum" in capsys.readouterr().out
    part = next(p for p in path.iterdir() if p.name.startswith("part-"))
    chunk = part / "state" / "c" / "2" / "0" / "0"
    chunk.write_bytes(bytes(255 - b for b in chunk.read_bytes()))  # same size: only the checksum can tell
    assert main(["inspect", str(path)]) == 0  # sizes agree
    capsys.readouterr()
    args = build_parser().parse_args(["inspect", str(path), "--verify"])
    with pytest.raises(
        pydso.DatasetError, match=r"variable 'state', chunk \(2, 0, 0\).*does not match its recorded checksum"
    ):
        args.func(args)
