"""Training: tiny CPU smoke run through `daptq train`, reproducibility, schedule, model selection."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from daptq_ros.cli import main as daptq_main
from daptq_ros.config_util import ConfigError
from daptq_ros.model import train as train_mod
from daptq_ros.model.io import load_checkpoint
from daptq_ros.model.testing import synthetic_cache, write_synthetic_demos
from daptq_ros.model.torch_policy import TorchPolicy
from daptq_ros.model.train import TrainRun, _selection_key, lr_factor, train
from daptq_ros.model.train_cli import load_model_file
from daptq_ros.policy_api import Observation

TINY = Path(__file__).resolve().parents[1] / "config" / "model_tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_synthetic_demos(root / "demos", episodes_per_task=3)
    synthetic_cache().save(root / "cache.safetensors")
    return root


def test_cli_smoke_run_learns_and_writes_a_loadable_checkpoint(data, tmp_path):
    out = tmp_path / "run" / "policy.safetensors"
    log = tmp_path / "run" / "log.json"
    code = daptq_main(
        [
            "train",
            "--demos",
            str(data / "demos"),
            "--instructions",
            str(data / "cache.safetensors"),
            "--out",
            str(out),
            "--config",
            str(TINY),
            "--device",
            "cpu",
            "--seed",
            "0",
            "--log-json",
            str(log),
        ]
    )
    assert code == 0
    summary = json.loads(log.read_text())
    train_losses = [h["train_loss"] for h in summary["history"] if "train_loss" in h]
    val_losses = [h["val_loss"] for h in summary["history"] if "val_loss" in h]
    assert len(train_losses) == 6 and len(val_losses) == 2
    assert train_losses[-1] < 0.85 * train_losses[0]
    assert val_losses[-1] < val_losses[0]
    assert summary["frames_per_s"] > 0
    loaded = load_checkpoint(out)
    assert loaded.config.head == "flow" and loaded.config.image_size == 32
    meta = loaded.meta["train"]
    assert meta["command"].startswith("daptq train ") and f"--demos {data / 'demos'}" in meta["command"]
    assert "--seed 0" in meta["command"] and meta["seed"] == 0 and meta["git"]
    assert meta["selected_by"] == "val_loss" and meta["val_loss"] == pytest.approx(min(val_losses))
    assert sorted(loaded.instructions) == sorted(synthetic_cache().instructions)
    assert (out.parent / "instructions.safetensors").is_file()
    policy = TorchPolicy.from_checkpoint(out, allow_encode=False)
    policy.reset("push the puck to the goal", seed=0)
    action = policy.act(Observation(image=np.zeros((32, 32, 3), np.uint8), proprio=np.zeros(4, np.float32)))
    assert action.shape == (4,) and np.all(np.isfinite(action))


def test_training_is_reproducible_on_cpu(data, tmp_path):
    model_cfg, train_cfg = load_model_file(TINY)
    train_cfg.steps, train_cfg.val_every, train_cfg.log_every = 6, 3, 3
    runs = []
    for name in ("a", "b"):
        run = TrainRun(
            demos=data / "demos",
            instructions=data / "cache.safetensors",
            out=tmp_path / name / "p.safetensors",
            device="cpu",
            seed=3,
        )
        runs.append(train(run, model_cfg, train_cfg))
    losses = [[h.get("train_loss") for h in r["history"]] for r in runs]
    assert losses[0] == losses[1]
    a, b = (
        load_checkpoint(tmp_path / "a" / "p.safetensors"),
        load_checkpoint(tmp_path / "b" / "p.safetensors"),
    )
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_closed_loop_selection_prefers_success_then_val_loss(data, tmp_path, monkeypatch):
    successes = iter([0.4, 0.7, 0.7])
    monkeypatch.setattr(train_mod, "_closed_loop_eval", lambda *a: {"success_rate": next(successes)})
    model_cfg, train_cfg = load_model_file(TINY)
    train_cfg.steps, train_cfg.val_every, train_cfg.log_every = 9, 100, 3
    run = TrainRun(
        demos=data / "demos",
        instructions=data / "cache.safetensors",
        out=tmp_path / "p.safetensors",
        device="cpu",
        eval_every=3,
    )
    summary = train(run, model_cfg, train_cfg)
    evals = [(h["step"], h["eval"]["success_rate"], h["val_loss"]) for h in summary["history"] if "eval" in h]
    assert [e[:2] for e in evals] == [(3, 0.4), (6, 0.7), (9, 0.7)]
    expected = max(evals[1:], key=lambda e: -e[2])[0]  # tie at 0.7 -> lower validation loss
    assert summary["best"]["step"] == expected
    meta = load_checkpoint(tmp_path / "p.safetensors").meta["train"]
    assert meta["selected_by"] == "eval_success" and meta["eval_success"] == 0.7 and meta["step"] == expected


def test_selection_key_and_schedule():
    assert _selection_key({"val_loss": 1.0}, eval_active=True, final=False) is None
    assert _selection_key({"val_loss": 1.0}, eval_active=False, final=False) == (0.0, 0.0, -1.0)
    assert _selection_key({"eval": {"success_rate": 0.1}, "val_loss": 9.0}, True, False) > _selection_key(
        {"val_loss": 0.1}, False, False
    )
    assert _selection_key({}, eval_active=False, final=True) == (0.0, 0.0, 0.0)
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    # a time limit that is ahead of the step count drives the decay (runs cut by time end annealed)
    assert lr_factor(20, 100, 10, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_factor(20, 100, 10, 0.1, time_fraction=1.2) == pytest.approx(0.1)
    assert lr_factor(80, 100, 10, 0.1, time_fraction=0.01) == lr_factor(80, 100, 10, 0.1)


def test_time_limit_stops_and_anneals(data, tmp_path):
    model_cfg, train_cfg = load_model_file(TINY)
    train_cfg.steps, train_cfg.log_every, train_cfg.val_every = 100000, 1, 100000
    run = TrainRun(
        demos=data / "demos",
        instructions=data / "cache.safetensors",
        out=tmp_path / "p.safetensors",
        device="cpu",
        time_limit_s=1.0,
    )
    summary = train(run, model_cfg, train_cfg)
    assert 0 < summary["steps_done"] < 100000
    lrs = [h["lr"] for h in summary["history"] if "lr" in h]
    assert lrs[-1] < 0.2 * max(lrs)  # the schedule followed elapsed time down to (near) min_lr
    assert load_checkpoint(tmp_path / "p.safetensors").meta["train"]["step"] == summary["steps_done"]


def test_model_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  head: diffusion\n")
    with pytest.raises(ConfigError, match="head"):
        load_model_file(bad)
    bad.write_text("modle:\n  head: flow\n")
    with pytest.raises(ConfigError, match="modle"):
        load_model_file(bad)
    bad.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_model_file(bad)
    for name in ("model.yaml", "model_regression.yaml", "model_tiny.yaml"):
        model_cfg, _ = load_model_file(TINY.parent / name)
        assert model_cfg.head in ("flow", "regression")


def test_cli_reports_bad_inputs(data, tmp_path):
    code = daptq_main(
        [
            "train",
            "--demos",
            str(tmp_path / "none"),
            "--instructions",
            str(data / "cache.safetensors"),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--config",
            str(TINY),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    code = daptq_main(
        [
            "train",
            "--demos",
            str(data / "demos"),
            "--instructions",
            str(data / "cache.safetensors"),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--config",
            str(TINY),
            "--lr",
            "-1",
        ]
    )
    assert code == 2
