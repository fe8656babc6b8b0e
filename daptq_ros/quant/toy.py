"""Two small policies with adapters: worked examples of quantizing a custom PyTorch policy.

- :class:`ToyVLA`: conv stem + transformer trunk (explicit q/k/v/o Linears) + a VL→action
  interface + a DiT-style flow-matching head integrated with fixed Euler steps over given noise
  (the reference VLA's structure in miniature), 4-d actions.
- :class:`ToyConvPolicy`: conv + MLP regression policy with 7-d actions and no attention.

Both learn a synthetic but non-trivial regression task (a fixed random teacher of image and
proprio features) in a few hundred CPU steps (:func:`train_toy`). They serve the unit tests and
``daptq quantize --policy daptq_ros.quant.toy:toy_vla_provider`` (a CLI policy provider).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daptq_ros.quant.adapter import PolicyAdapter

IMAGE = 16
PROPRIO = 4


class ToyAttention(nn.Module):
    """Self-attention with explicit projections and a ``heads`` attribute."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q, k, v = (p(x).reshape(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, n, d))


class ToyMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = ToyAttention(dim, heads), ToyMLP(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyDiTBlock(nn.Module):
    """adaLN DiT block (shift/scale/gate from the conditioning vector)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn, self.mlp = ToyAttention(dim, heads), ToyMLP(dim, 2 * dim)
        self.adaln = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, m1, g1, s2, m2, g2 = self.adaln(F.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(self.norm1(x) * (1 + m1[:, None]) + s1[:, None])
        return x + g2[:, None] * self.mlp(self.norm2(x) * (1 + m2[:, None]) + s2[:, None])


class ToyVLA(nn.Module):
    """Miniature VLA: image (B,3,16,16), proprio (B,4), noise (B,H,4) -> actions (B,H,4)."""

    def __init__(self, dim: int = 48, heads: int = 4, horizon: int = 4, action_dim: int = 4, steps: int = 4):
        super().__init__()
        self.horizon, self.action_dim, self.steps = horizon, action_dim, steps
        self.vision = nn.ModuleDict(
            {
                "conv1": nn.Conv2d(3, 16, 3, stride=2, padding=1),
                "conv2": nn.Conv2d(16, 32, 3, stride=2, padding=1),
                "proj": nn.Linear(32, dim),
            }
        )
        self.vision_pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.proprio_proj = nn.Linear(PROPRIO, dim)
        self.readout = nn.Parameter(torch.randn(1, 2, dim) * 0.02)
        self.trunk = nn.ModuleList([ToyBlock(dim, heads) for _ in range(2)])
        self.trunk_norm = nn.LayerNorm(dim)
        self.vl_action_interface = nn.ModuleDict({"fc1": nn.Linear(dim, dim), "fc2": nn.Linear(dim, dim)})
        self.action_head = nn.ModuleDict(
            {
                "action_in": nn.Linear(action_dim, dim),
                "time_fc": nn.Linear(dim, dim),
                "cond_pool": nn.Linear(dim, dim),
                "blocks": nn.ModuleList([ToyDiTBlock(dim, heads) for _ in range(2)]),
                "final": nn.Linear(dim, action_dim),
            }
        )
        self.action_pos = nn.Parameter(torch.randn(1, horizon, dim) * 0.02)

    def condition(self, image: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        v = self.vision
        feat = F.gelu(v["conv2"](F.gelu(v["conv1"](image))))  # (B, 32, 4, 4)
        tokens = v["proj"](feat.flatten(2).transpose(1, 2)) + self.vision_pos
        x = torch.cat(
            [tokens, self.proprio_proj(proprio)[:, None], self.readout.expand(len(image), -1, -1)], 1
        )
        for block in self.trunk:
            x = block(x)
        r = self.trunk_norm(x)  # all trunk tokens condition the head (learns fast at toy scale)
        return self.vl_action_interface["fc2"](F.gelu(self.vl_action_interface["fc1"](r)))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity at noisy actions ``x`` (B,H,A) and times ``t`` (B,)."""
        h = self.action_head
        freqs = torch.arange(z.shape[-1] // 2, dtype=z.dtype) + 1.0
        arg = t[:, None] * 6.0 * freqs[None]
        c = h["time_fc"](torch.cat([torch.cos(arg), torch.sin(arg)], -1)) + h["cond_pool"](z.mean(1))
        tok = torch.cat([z, h["action_in"](x) + self.action_pos], dim=1)
        for block in h["blocks"]:
            tok = block(tok, c)
        return h["final"](tok[:, -self.horizon :])

    def forward(self, image: torch.Tensor, proprio: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        z = self.condition(image, proprio)
        x = noise
        for i in range(self.steps):
            t = torch.full((len(x),), i / self.steps)
            x = x + self.velocity(x, t, z) / self.steps
        return x

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Action MSE of the integrated flow from the batch noise (trained through the sampler:
        at toy scale this fits in a few hundred steps, where velocity matching does not)."""
        return F.mse_loss(self(batch["image"], batch["proprio"], batch["noise"]), batch["actions"])


class ToyConvPolicy(nn.Module):
    """Conv + MLP regression policy: image (B,3,16,16), proprio (B,4) -> actions (B,3,7)."""

    def __init__(self, horizon: int = 3, action_dim: int = 7) -> None:
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.conv = nn.Conv2d(3, 12, 5, stride=3, padding=2)
        self.fc1 = nn.Linear(12 * 36 + PROPRIO, 96)
        self.fc2 = nn.Linear(96, 96)
        self.out = nn.Linear(96, horizon * action_dim)

    def forward(self, image: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv(image)).flatten(1)
        h = F.gelu(self.fc2(F.gelu(self.fc1(torch.cat([h, proprio], 1)))))
        return self.out(h).reshape(-1, self.horizon, self.action_dim)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self(batch["image"], batch["proprio"]), batch["actions"])


class ToyVLAAdapter(PolicyAdapter):
    """Adapter of :class:`ToyVLA` (flow head, EE-delta actions)."""

    action_head_prefix = "action_head"
    action_space = "ee_delta"
    action_dim_names = ("dx", "dy", "dz", "gripper")

    def run(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["image"], batch["proprio"], batch["noise"])

    def output_layer(self, model: nn.Module) -> str | None:
        return "action_head.final"

    def interface_layers(self, model: nn.Module) -> list[str]:
        return ["vl_action_interface.fc1", "vl_action_interface.fc2"]


class ToyConvAdapter(PolicyAdapter):
    """Adapter of :class:`ToyConvPolicy` (regression head ``out``, 7-d actions)."""

    action_head_prefix = "out"
    action_space = "ee_delta"
    action_dim_names = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")

    def run(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["image"], batch["proprio"])

    def output_layer(self, model: nn.Module) -> str | None:
        return "out"

    def interface_layers(self, model: nn.Module) -> list[str]:
        return ["fc2"]


@dataclass
class ToyTask:
    """A fixed random teacher mapping (image, proprio) to action chunks."""

    horizon: int
    action_dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(1000 + self.seed)
        self.w1 = torch.randn(3 * 16 + PROPRIO, 64, generator=g) / math.sqrt(52)
        self.w2 = torch.randn(64, self.horizon * self.action_dim, generator=g) / 8.0

    def batches(
        self, frames: int, batch_size: int = 32, seed: int = 0, noise: bool = True
    ) -> list[dict[str, torch.Tensor]]:
        """Seeded batches with ``image``, ``proprio``, ``noise`` and target ``actions``."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, frames, batch_size):
            b = min(batch_size, frames - start)
            coarse = torch.randn(b, 3, 4, 4, generator=g)
            image = F.interpolate(coarse, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
            image = (image + 0.1 * torch.randn(b, 3, IMAGE, IMAGE, generator=g)).sigmoid()
            proprio = torch.randn(b, PROPRIO, generator=g)
            feats = torch.cat([F.adaptive_avg_pool2d(image - 0.5, 4).flatten(1) * 4, proprio], 1)
            acts = torch.tanh(torch.tanh(feats @ self.w1) @ self.w2).reshape(b, self.horizon, self.action_dim)
            batch = {"image": image, "proprio": proprio, "actions": acts}
            if noise:
                batch["noise"] = torch.randn(b, self.horizon, self.action_dim, generator=g)
            out.append(batch)
        return out


def train_toy(model: nn.Module, task: ToyTask, steps: int = 300, lr: float = 3e-3, seed: int = 0) -> float:
    """Train ``model`` on ``task`` with AdamW; returns the final training loss."""
    torch.manual_seed(seed)
    data = task.batches(2048, batch_size=64, seed=seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        loss = model.loss(data[step % len(data)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def build_toy(
    kind: str = "vla", train_steps: int = 300, seed: int = 0
) -> tuple[nn.Module, PolicyAdapter, ToyTask]:
    """A trained toy policy, its adapter and task (``kind``: ``vla`` or ``conv``)."""
    torch.manual_seed(seed)
    if kind == "vla":
        model: nn.Module = ToyVLA()
        adapter: PolicyAdapter = ToyVLAAdapter()
        task = ToyTask(model.horizon, model.action_dim, seed)
    elif kind == "conv":
        model, adapter = ToyConvPolicy(), ToyConvAdapter()
        task = ToyTask(model.horizon, model.action_dim, seed)
    else:
        raise ValueError(f"toy kind must be 'vla' or 'conv', got {kind!r}")
    if train_steps:
        train_toy(model, task, train_steps, seed=seed)
    return model, adapter, task


def toy_vla_provider(args: Any) -> dict[str, Any]:
    """CLI policy provider (``--policy daptq_ros.quant.toy:toy_vla_provider``).

    Honors ``args.checkpoint`` (a safetensors state dict of :class:`ToyVLA`) when given;
    otherwise trains a toy for 300 steps. Returns model, adapter, calibration batches,
    base metadata and a ``model_factory`` for :func:`daptq_ros.quant.checkpoint.load_quantized`.
    """
    from safetensors.torch import load_file

    ckpt = getattr(args, "checkpoint", None)
    if ckpt:
        model, adapter, task = build_toy("vla", train_steps=0)
        model.load_state_dict(load_file(ckpt))
    else:
        model, adapter, task = build_toy("vla")
    return {
        "model": model,
        "adapter": adapter,
        "calib_batches": task.batches(256, seed=7),
        "base": {"format": "toy-vla", "version": 1},
        "model_factory": lambda base: ToyVLA(),
    }
