"""Scripted demo generation: contract round trip, resume, validation of episode files."""

import numpy as np
import pytest

from daptq_ros.cli import main as daptq_main
from daptq_ros.sim.dataset_index import (
    EpisodeFormatError,
    episode_path,
    list_episodes,
    load_episode,
    parse_episode_name,
)
from daptq_ros.sim.demos import generate_demos

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    summaries = generate_demos(out, "reach-v3", episodes_per_task=1, seed=7, workers=1,
                               image_size=128, max_steps=200)
    assert len(summaries) == 1 and summaries[0].written == 1 and summaries[0].complete
    return out


def test_demo_episode_matches_contract(demo_dir):
    files = list_episodes(demo_dir)
    assert files == [episode_path(demo_dir, "reach-v3", 7)]
    assert files[0].name == "reach-v3_s7.npz" and parse_episode_name(files[0]) == ("reach-v3", 7)
    ep = load_episode(files[0])
    t = ep["action"].shape[0]
    assert 1 <= t <= 200
    assert ep["image"].shape == (t, 128, 128, 3) and ep["image"].dtype == np.uint8
    assert ep["proprio"].shape == (t, 4) and ep["proprio"].dtype == np.float32
    assert ep["state"].shape == (t, 39) and ep["action"].dtype == np.float32
    np.testing.assert_array_equal(ep["proprio"], ep["state"][:, :4])
    assert np.all(np.abs(ep["action"]) <= 1.0)
    assert ep["instruction"] == "reach the red goal position"
    assert (ep["task"], ep["seed"], ep["success"]) == ("reach-v3", 7, True)
    assert not list(demo_dir.glob("*/*.tmp*")), "no temporary files may be left behind"


def test_resume_skips_existing_episodes(demo_dir):
    path = episode_path(demo_dir, "reach-v3", 7)
    before = path.stat().st_mtime_ns
    stale = path.with_name("reach-v3_s9.npz.tmp4242")  # what a killed writer leaves behind
    stale.write_bytes(b"half a file")
    summaries = generate_demos(demo_dir, ["reach-v3"], episodes_per_task=1, seed=7, workers=1)
    assert summaries[0].existing == 1 and summaries[0].written == 0
    assert path.stat().st_mtime_ns == before
    assert not stale.exists()


def test_cli_adds_missing_episodes_with_next_seed(demo_dir, capsys):
    rc = daptq_main(["sim", "demos", "--out", str(demo_dir), "--tasks", "reach-v3",
                     "--episodes-per-task", "2", "--seed", "7", "--workers", "1", "--image-size", "128"])
    assert rc == 0
    assert [parse_episode_name(p)[1] for p in list_episodes(demo_dir)] == [7, 8]
    out = capsys.readouterr().out
    assert "reach-v3" in out and "have" in out


def test_failed_episodes_are_dropped_and_reported(tmp_path):
    # 3 steps can never reach the goal: every seed fails, the task ends short after the extra seeds.
    summaries = generate_demos(tmp_path, "reach-v3", episodes_per_task=1, seed=0, workers=1,
                               image_size=32, max_steps=3, max_extra_seeds=1)
    s = summaries[0]
    assert s.written == 0 and not s.complete and s.failed_seeds == [0, 1]
    assert list_episodes(tmp_path) == []


def test_load_episode_validation(tmp_path, demo_dir):
    good = load_episode(episode_path(demo_dir, "reach-v3", 7))
    missing = tmp_path / "reach-v3_s1.npz"
    np.savez_compressed(missing, image=good["image"], proprio=good["proprio"])
    with pytest.raises(EpisodeFormatError, match=r"missing key.*state"):
        load_episode(missing)
    bad_dtype = tmp_path / "reach-v3_s2.npz"
    arrays = {k: (np.array(v) if not isinstance(v, np.ndarray) else v) for k, v in good.items()}
    arrays["action"] = good["action"].astype(np.float64)
    np.savez_compressed(bad_dtype, **arrays)
    with pytest.raises(EpisodeFormatError, match="'action' must be float32"):
        load_episode(bad_dtype)
    short = tmp_path / "reach-v3_s3.npz"
    arrays["action"] = good["action"][:-1]
    np.savez_compressed(short, **arrays)
    with pytest.raises(EpisodeFormatError, match="disagree on the episode length"):
        load_episode(short)
    renamed = tmp_path / "reach-v3_s5.npz"
    arrays["action"] = good["action"]
    np.savez_compressed(renamed, **arrays)
    with pytest.raises(EpisodeFormatError, match="file name says task 'reach-v3' seed 5"):
        load_episode(renamed)
    garbage = tmp_path / "reach-v3_s4.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(EpisodeFormatError, match="not a readable npz"):
        load_episode(garbage)
    with pytest.raises(FileNotFoundError):
        load_episode(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="episode directory"):
        list_episodes(tmp_path / "absent")


def test_cli_bad_arguments_exit_2(tmp_path):
    assert daptq_main(["sim", "demos", "--out", str(tmp_path), "--tasks", "reach-v9"]) == 2
    assert daptq_main(["sim", "demos", "--out", str(tmp_path), "--episodes-per-task", "0"]) == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        generate_demos(tmp_path, "reach-v9")
    with pytest.raises(ValueError, match="episodes_per_task"):
        generate_demos(tmp_path, "reach-v3", episodes_per_task=0)
