"""Closed-loop evaluator: expert sanity run, JSON structure, drift metrics, determinism, errors."""

import json
import shutil

import numpy as np
import pytest

from daptq_ros.cli import main as daptq_main
from daptq_ros.policy_api import Observation
from daptq_ros.sim.evaluate import EvalConfig, evaluate, load_policy, policy_kind
from daptq_ros.sim.expert import ExpertPolicy

pytestmark = pytest.mark.sim


class OffsetExpert(ExpertPolicy):
    """The expert with a constant bias on dx: a stand-in for a quantized policy with known error."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        chunk = super().predict_chunk(obs, noise).copy()
        chunk[:, 0] += self.offset
        return chunk


class NanPolicy(ExpertPolicy):
    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        return np.full((1, 4), np.nan, dtype=np.float32)


def test_cli_expert_reach_json_and_trajectories(tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    traj = tmp_path / "traj"
    rc = daptq_main(["evaluate", "--policy", "expert", "--tasks", "reach-v3", "--episodes", "1",
                     "--workers", "1", "--json", str(out_json), "--trajectories", str(traj)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["format"] == "daptq-eval" and result["version"] == 1
    assert result["policy"] == "expert" and result["reference"] is None
    assert result["config"]["seed"] == 100_000 and result["config"]["max_steps"] == 200
    task = result["tasks"]["reach-v3"]
    assert task["successes"] == 1 and task["success_rate"] == 1.0
    assert task["ci95"][0] == pytest.approx(0.2065, abs=1e-4) and task["ci95"][1] == 1.0
    assert 0 < task["mean_steps"] == task["mean_steps_success"] < 200
    assert result["overall"]["mean_task_success_rate"] == 1.0
    ep = result["episodes"][0]
    assert (ep["task"], ep["seed"], ep["success"]) == ("reach-v3", 100_000, True)
    assert result["timing"]["env_steps"] == ep["steps"] and result["timing"]["env_steps_per_s"] > 0
    with np.load(traj / "reach-v3" / "reach-v3_s100000.npz", allow_pickle=False) as z:
        assert z["hand"].shape == (ep["steps"] + 1, 3) and z["action"].shape == (ep["steps"], 4)
        assert bool(z["success"])
    assert "reach-v3" in capsys.readouterr().out


def test_expert_against_itself_has_zero_drift():
    result = evaluate("expert", "expert", EvalConfig(tasks=("push-v3",), episodes=1, max_steps=40,
                                                     image_size=32, workers=1))
    drift = result["tasks"]["push-v3"]["drift"]
    assert drift["ee_mean_distance"] == 0.0 and drift["ee_final_distance"] == 0.0
    assert drift["action_rms_diff_per_dof"] == [0.0] * 4
    assert drift["open_loop"]["steps"] == 40 and drift["open_loop"]["mean_per_dof"] == [0.0] * 4
    paired = result["tasks"]["push-v3"]["paired"]
    assert sum(paired.values()) == 1


def test_biased_candidate_shows_known_open_loop_error_and_divergence():
    result = evaluate(OffsetExpert(0.25), "expert", EvalConfig(tasks=("reach-v3",), episodes=1,
                                                               max_steps=30, image_size=32, workers=1))
    assert result["policy"].startswith("<") and result["reference"] == "expert"
    drift = result["tasks"]["reach-v3"]["drift"]
    # Open loop: same observation, the candidate is off by exactly 0.25 on dx and nothing else.
    assert drift["open_loop"]["mean_per_dof"] == pytest.approx([0.25, 0, 0, 0], abs=1e-6)
    assert drift["open_loop"]["mean_first_action"] == pytest.approx([0.25, 0, 0, 0], abs=1e-6)
    # Closed loop: the bias pushes the hand away from the reference rollout.
    assert drift["ee_final_distance"] > 0.01 and drift["ee_mean_distance"] > 0
    assert drift["action_rms_diff_per_dof"][0] > 0


def test_non_finite_actions_fail_the_episode():
    result = evaluate(NanPolicy(), None, EvalConfig(tasks=("reach-v3",), episodes=1, max_steps=10,
                                                    image_size=32, workers=1))
    ep = result["episodes"][0]
    assert not ep["success"] and ep["steps"] == 0 and "non-finite" in ep["aborted"]


def test_results_do_not_depend_on_worker_count():
    cfg = {"tasks": ("reach-v3", "push-v3"), "episodes": 2, "max_steps": 15, "image_size": 32}
    one = evaluate("expert", "expert", EvalConfig(workers=1, **cfg))
    two = evaluate("expert", "expert", EvalConfig(workers=2, **cfg))
    assert two["timing"]["workers"] == 2
    assert one["episodes"] == two["episodes"] and one["tasks"] == two["tasks"]
    assert [e["seed"] for e in one["episodes"]] == [100_000, 100_001] * 2


def test_policy_spec_errors(tmp_path):
    assert policy_kind("expert") == "expert"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_policy(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        load_policy(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported policy file"):
        load_policy(tmp_path / "model.pt")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert policy_kind(tmp_path / "art") == "onnx" and policy_kind(tmp_path / "m.safetensors") == "torch"
    with pytest.raises(TypeError, match="StepPolicy"):
        evaluate(object(), None, EvalConfig(tasks=("reach-v3",), episodes=1))
    with pytest.raises(ValueError, match="episodes"):
        EvalConfig(episodes=0)
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(tasks=("reach-v1",))


def test_cli_reports_bad_policy_spec(tmp_path):
    rc = daptq_main(["evaluate", "--policy", str(tmp_path / "nope"), "--tasks", "reach-v3"])
    assert rc == 2


def test_torch_checkpoint_drift_against_itself_and_another_model(tmp_path):
    """End to end through load_policy's checkpoint path, with a flow head (noise-dependent)."""
    testing = pytest.importorskip("daptq_ros.model.testing")
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    ckpt_a = testing.write_tiny_checkpoint(tmp_path / "a", seed=0)
    # A perturbed copy (the fresh model zero-initializes its output layers, so two random seeds
    # would both predict the mean action): a stand-in for a quantized twin.
    with safe_open(str(ckpt_a), "np") as f:
        meta = f.metadata()
    rng = np.random.default_rng(0)
    tensors = {k: v + (0.05 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
               for k, v in load_file(str(ckpt_a)).items()}
    (tmp_path / "b").mkdir()
    ckpt_b = tmp_path / "b" / "policy.safetensors"
    save_file(tensors, str(ckpt_b), metadata=meta)
    shutil.copy(tmp_path / "a" / "instructions.safetensors", tmp_path / "b" / "instructions.safetensors")
    cfg = EvalConfig(tasks=("reach-v3",), episodes=1, max_steps=8, image_size=32, workers=1)
    import torch

    torch.set_num_threads(2)
    try:
        same = evaluate(str(ckpt_b), str(ckpt_b), cfg)["tasks"]["reach-v3"]["drift"]
        assert torch.get_num_threads() == 2, "an in-process run must restore the caller's threads"
    finally:
        torch.set_num_threads(1)
    # Same weights, same probe noise, same per-episode generator seed: identical rollouts.
    assert same["open_loop"]["steps"] == 8 and max(same["open_loop"]["max_per_dof"]) == 0.0
    assert same["ee_final_distance"] == 0.0 and max(same["action_rms_diff_per_dof"]) == 0.0
    other = evaluate(str(ckpt_a), str(ckpt_b), cfg)["tasks"]["reach-v3"]["drift"]
    assert min(other["open_loop"]["mean_per_dof"]) > 0.0
    assert np.asarray(other["open_loop"]["mean_per_horizon"]).shape == (4, 4)  # chunk 4 x 4 DoF
    assert other["ee_mean_distance"] > 0.0
