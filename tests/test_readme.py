"""The README's quickstart runs as written (so the front page cannot rot)."""

import pathlib
import re

import matplotlib

matplotlib.use("Agg")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python code block"
    monkeypatch.chdir(tmp_path)  # the quickstart writes a checkpoint file
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quickstart", "exec"), namespace)
    result = namespace["result"]
    assert (tmp_path / "run.npz").exists()
    # The quickstart's LQR gain improves on the zero gain it starts from.
    assert result.history["objective"][-1] < 0.5 * result.history["objective"][0]


def test_readme_test_command_is_what_ci_runs():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(?:#.*\n)?(.*?)\n```", text)
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1 and test_command[0] in ci.splitlines()


def test_readme_sysid_quickstart_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## System identification quickstart", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "README.md system identification quickstart", "exec"), namespace)
    result, score = namespace["result"], namespace["score"]
    est = result.as_dict()
    for name, true in (("a", 0.8), ("b", 1.2)):
        i = result.names.index(name)
        assert abs(est[name] - true) < 4 * result.stderr[i], (name, est[name])
    assert result.multistart.n_starts == 4 and score.fit_percent[0] > 90.0
    assert "95% CI" in capsys.readouterr().out
