"""ReferenceVLA: shapes, determinism, padding-mask invariance, losses, config validation."""

import pytest
import torch
from torch import nn

from daptq_ros.model.config import TrainConfig, VLAConfig
from daptq_ros.model.testing import tiny_config
from daptq_ros.model.vla import Block, FlowHead, ReferenceVLA, RegressionHead


@pytest.fixture(params=["flow", "regression"])
def model(request):
    torch.manual_seed(0)
    return ReferenceVLA(tiny_config(head=request.param)).eval()


def _perturb_head(m: ReferenceVLA) -> None:
    """adaLN-zero / zero-init final layers make a fresh flow head output 0: give it random weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.action_head.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_output_shape_and_head_type(model):
    cfg = model.config
    x = model.example_inputs(3)
    out = model(**x)
    assert out.shape == (3, cfg.chunk_size, cfg.action_dim)
    assert torch.isfinite(out).all()
    assert isinstance(model.action_head, FlowHead if cfg.head == "flow" else RegressionHead)
    assert ("noise" in x) == (cfg.head == "flow")
    assert model.input_names[-1] == ("noise" if cfg.head == "flow" else "proprio")


def test_named_submodules_follow_the_contract(model):
    names = dict(model.named_modules())
    for name in (
        "vision",
        "lang_proj",
        "proprio_proj",
        "trunk",
        "vl_action_interface",
        "action_head",
        "trunk.blocks.0.attn.q_proj",
        "trunk.blocks.0.attn.k_proj",
        "trunk.blocks.0.attn.v_proj",
        "trunk.blocks.0.attn.o_proj",
        "trunk.blocks.0.mlp.fc1",
        "trunk.blocks.0.mlp.fc2",
        "vl_action_interface.fc1",
        "vl_action_interface.fc2",
        "action_head.blocks.0.attn.q_proj",
        "action_head.blocks.0.mlp.fc2",
        "action_head.final",
    ):
        assert name in names, name
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    if model.config.head == "flow":
        assert isinstance(names["action_head.blocks.0.adaln"], nn.Linear)


def test_flow_is_deterministic_given_noise():
    torch.manual_seed(0)
    m = ReferenceVLA(tiny_config(head="flow")).eval()
    _perturb_head(m)
    x = m.example_inputs(2)
    with torch.no_grad():
        a, b = m(**x), m(**x)
        c = m(**{**x, "noise": torch.randn_like(x["noise"])})
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


def test_regression_ignores_noise():
    torch.manual_seed(0)
    model = ReferenceVLA(tiny_config(head="regression")).eval()
    x = model.example_inputs(2)
    noise = torch.randn(2, model.config.chunk_size, model.config.action_dim)
    with torch.no_grad():
        assert torch.equal(model(**x), model(**x, noise=noise))


def test_padding_mask_invariance(model):
    """Changing the features of padded language tokens must not change the actions at all."""
    _perturb_head(model)
    x = model.example_inputs(2)
    pad = x["lang_mask"] == 0
    assert pad.any()
    tokens = x["lang_tokens"].clone()
    tokens[pad] = torch.randn_like(tokens[pad]) * 10.0
    with torch.no_grad():
        ref = model(**x)
        out = model(**{**x, "lang_tokens": tokens})
        # ... while valid tokens do matter
        valid_changed = x["lang_tokens"].clone()
        valid_changed[~pad] += 1.0
        other = model(**{**x, "lang_tokens": valid_changed})
    assert torch.equal(ref, out)
    assert not torch.allclose(ref, other, atol=1e-5)


def test_last_block_readout_only_matches_full_block():
    torch.manual_seed(0)
    block = Block(16, 2, 2).eval()
    x = torch.randn(2, 10, 16)
    bias = torch.zeros(2, 1, 1, 10)
    bias[0, ..., 3] = -1e4
    with torch.no_grad():
        full = block(x, bias)[:, -3:]
        part = block(x, bias, n_queries=3)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)


def test_losses_are_finite_and_backpropagate(model):
    model.train()
    cfg = model.config
    batch = model.example_inputs(4)
    batch["actions"] = torch.randn(4, cfg.chunk_size, cfg.action_dim)
    batch["action_valid"] = torch.ones(4, cfg.chunk_size)
    batch["action_valid"][0, 2:] = 0
    out = model.loss(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(KeyError, match="actions"):
        model.loss({k: v for k, v in batch.items() if k != "actions"})


def test_masked_chunk_steps_do_not_affect_the_loss():
    torch.manual_seed(0)
    m = ReferenceVLA(tiny_config(head="regression")).eval()
    cfg = m.config
    batch = m.example_inputs(2)
    batch["actions"] = torch.randn(2, cfg.chunk_size, cfg.action_dim)
    batch["action_valid"] = torch.ones(2, cfg.chunk_size)
    batch["action_valid"][:, -1] = 0
    changed = batch["actions"].clone()
    changed[:, -1] += 100.0
    with torch.no_grad():
        assert torch.equal(m.loss(batch)["loss"], m.loss({**batch, "actions": changed})["loss"])


def test_flow_samples_repeat_the_condition_for_the_head_only():
    torch.manual_seed(0)
    head = FlowHead(tiny_config()).eval()
    cfg = tiny_config()
    z = torch.randn(3, cfg.readout_tokens, cfg.head_dim)
    actions = torch.randn(3, cfg.chunk_size, cfg.action_dim)
    valid = torch.ones(3, cfg.chunk_size)
    valid[1, 5:] = 0
    with torch.no_grad():
        torch.manual_seed(1)
        repeated = head.loss(z, actions, valid, samples=4)["loss"]
        torch.manual_seed(1)
        expanded = head.loss(
            *(x.repeat_interleave(4, dim=0) for x in (z, actions, valid)), samples=1
        )["loss"]
        torch.manual_seed(1)
        single = head.loss(z, actions, valid, samples=1)["loss"]
    assert torch.equal(repeated, expanded)
    assert not torch.equal(repeated, single)


def test_bad_input_shapes_name_the_input(model):
    x = model.example_inputs(1)
    with pytest.raises(ValueError, match="proprio"):
        model(**{**x, "proprio": torch.zeros(1, 7)})
    with pytest.raises(ValueError, match="image"):
        model(**{**x, "image": torch.zeros(1, 3, 16, 16)})
    if model.config.head == "flow":
        with pytest.raises(ValueError, match="noise"):
            model(**{**x, "noise": torch.zeros(1, 3, 4)})


def test_default_config_size():
    n_flow = sum(p.numel() for p in ReferenceVLA(VLAConfig()).parameters())
    n_reg = sum(p.numel() for p in ReferenceVLA(VLAConfig(head="regression")).parameters())
    assert 3e6 < n_reg < n_flow < 8e6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"head": "diffusion"}, "head"),
        ({"d_model": 100}, "d_model"),
        ({"image_size": 100}, "image_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"version": 9}, "version"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VLAConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": 0.0}, "lr"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"flow_samples": 0}, "flow_samples"),
    ],
)
def test_train_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)
