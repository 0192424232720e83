"""Minari interchange (pydso.data.from_minari / to_minari): a Pendulum-v1 dataset collected locally with Minari's
DataCollector (no downloads; MINARI_DATASETS_PATH is a temporary directory) is read into a pydso store, written back
to Minari and read again; the behaviour log-density comes from the dataset's infos or from the user's policy."""

import gymnasium as gym
import numpy as np
import pytest

import pydso
from pydso import data as pdata

minari = pytest.importorskip("minari")
from minari import DataCollector, StepDataCallback  # noqa: E402

EPISODES, STEPS = 4, 30


def width(obs):
    """Half-width of the uniform behaviour policy: state dependent, inside Pendulum-v1's torque range [-2, 2]."""
    return 1.0 + 0.5 * np.abs(np.asarray(obs)[..., 1])


def policy_logp(observations, actions):
    """log pi(a_t | o_t) of the behaviour policy a ~ U(-w(o), w(o)) for an episode's (T+1, 3) and (T, 1) arrays."""
    return -np.log(2.0 * width(observations[:-1]))


class LogProb:
    """The behaviour policy; it leaves the log-density of its last action for the step callback."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.last = np.nan

    def __call__(self, obs):
        w = width(obs)
        self.last = float(-np.log(2.0 * w))
        return np.array([self.rng.uniform(-w, w)], np.float32)


@pytest.fixture
def collected(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    pi = LogProb(0)

    class Callback(StepDataCallback):
        def __call__(self, env, **kwargs):
            step = super().__call__(env, **kwargs)
            step["info"] = {"log_prob": np.float64(np.nan if kwargs.get("action") is None else pi.last)}
            return step

    env = DataCollector(
        gym.make("Pendulum-v1", max_episode_steps=STEPS), step_data_callback=Callback, record_infos=True
    )
    logps = []
    for e in range(EPISODES):
        obs, _ = env.reset(seed=e)
        lp, done = [], False
        while not done:
            obs, _, term, trunc, _ = env.step(pi(obs))
            lp.append(pi.last)
            done = term or trunc
        logps.append(lp)
    dataset = env.create_dataset(
        "pydso/pendulum-local-v0", algorithm_name="uniform", description="uniform policy", eval_env="Pendulum-v1"
    )
    env.close()
    return dataset, np.asarray(logps)


def test_minari_round_trip(collected, tmp_path):
    dataset, logps = collected
    episodes = list(dataset.iterate_episodes())
    ds = pdata.from_minari(dataset, behavior_logp="log_prob", path=tmp_path / "store")
    assert ds.sizes["episode"] == EPISODES and ds.sizes["time"] == STEPS + 1
    for e, ep in enumerate(episodes):
        np.testing.assert_allclose(ds["state"].values[e], ep.observations)
        np.testing.assert_allclose(ds["input"].values[e, :-1], ep.actions)
        np.testing.assert_allclose(ds["cost"].values[e, :-1], -ep.rewards)
        np.testing.assert_array_equal(ds["truncations"].values[e, :-1], ep.truncations)
        np.testing.assert_array_equal(ds["terminations"].values[e, :-1], ep.terminations)
    assert ds["truncations"].values[:, STEPS - 1].all() and not ds["terminations"].values.any()
    # the behaviour log-density from the infos equals the one the policy recorded, and the policy's own function
    np.testing.assert_allclose(ds["behavior_logp"].values[:, :-1], logps)
    from_policy = pdata.from_minari(dataset, behavior_logp=policy_logp)
    np.testing.assert_allclose(from_policy["behavior_logp"].values[:, :-1], logps, rtol=1e-6)
    # Pendulum-v1's reward from the observation and action: -(th^2 + 0.1 thdot^2 + 0.001 u^2) (the sign convention)
    obs, u = ds["state"].values[:, :-1], ds["input"].values[:, :-1, 0]
    th = np.arctan2(obs[..., 1], obs[..., 0])
    np.testing.assert_allclose(ds["cost"].values[:, :-1], th**2 + 0.1 * obs[..., 2] ** 2 + 0.001 * u**2, rtol=1e-5)
    # the store written by from_minari reopens with the same values
    stored = pdata.open(tmp_path / "store")
    np.testing.assert_allclose(stored["behavior_logp"].values, ds["behavior_logp"].values)
    np.testing.assert_array_equal(stored["mask"].values, ds["mask"].values)

    # back to Minari from the store, and in again: the same arrays (behaviour log-density via infos by default)
    back = pdata.to_minari(tmp_path / "store", "pydso/pendulum-roundtrip-v0", env="Pendulum-v1")
    assert back.total_episodes == EPISODES and back.total_steps == EPISODES * STEPS
    again = pdata.from_minari("pydso/pendulum-roundtrip-v0")
    for name in ("state", "input", "cost", "behavior_logp", "mask", "terminations", "truncations"):
        np.testing.assert_array_equal(again[name].values, ds[name].values, err_msg=name)
    # never overwrite: an existing id or store is refused, and the original still loads
    with pytest.raises(pdata.DatasetError, match="already exists"):
        pdata.to_minari(ds, "pydso/pendulum-roundtrip-v0")
    with pytest.raises(pdata.DatasetError):
        pdata.from_minari(dataset, path=tmp_path / "store")
    assert minari.load_dataset("pydso/pendulum-roundtrip-v0").total_episodes == EPISODES


def test_ragged_export_and_errors(collected, tmp_path):
    # ragged pydso episodes (a terminal set entered early) become terminated Minari episodes of their own length
    rng = np.random.default_rng(0)
    state = rng.normal(size=(3, 6, 2))
    mask = np.arange(6)[None, :] < np.array([[6], [4], [2]])
    cost = np.where(mask, rng.normal(size=(3, 6)), np.nan)
    inputs = rng.normal(size=(3, 6, 1))
    ds = pdata.make_dataset(state, input=inputs, cost=cost, mask=mask, behavior_logp=np.where(mask, -1.5, np.nan))
    exported = pdata.to_minari(ds, "pydso/ragged-v0")
    lengths = [len(ep) for ep in exported.iterate_episodes()]
    assert lengths == [5, 3, 1]
    eps = list(exported.iterate_episodes())
    assert eps[0].truncations[-1] and not eps[0].terminations.any() and eps[1].terminations[-1]
    again = pdata.from_minari(exported)
    np.testing.assert_array_equal(again["mask"].values, mask)
    np.testing.assert_allclose(np.where(mask, again["state"].values[..., 0], 0), np.where(mask, state[..., 0], 0))
    assert np.all(again["behavior_logp"].values[:, :-1][mask[:, 1:]] == -1.5)
    # errors name the argument and the fix
    dataset, _ = collected
    with pytest.raises(pydso.DatasetError, match="no infos entry 'nope'"):
        pdata.from_minari(dataset, behavior_logp="nope")
    with pytest.raises(pydso.DatasetError, match="one per step"):
        pdata.from_minari(dataset, behavior_logp=lambda o, a: np.zeros(3))
    with pytest.raises(pydso.DatasetError, match="does not download"):
        pdata.from_minari("pydso/missing-v0")
    with pytest.raises(pydso.DatasetError, match="'input'"):
        pdata.to_minari(pdata.make_dataset(state, cost=cost, mask=mask), "pydso/noinput-v0")
