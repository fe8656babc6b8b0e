"""Transformer trunks with random weights for the GPU speed benchmark.

A :class:`TrunkConfig` describes a pre-LN transformer (LayerNorm → attention → residual,
LayerNorm → GELU MLP → residual) whose Linears are plain ``nn.Linear`` so that
:func:`daptq_ros.gpu.linear.quantize_model` can swap them. Attention runs through
``F.scaled_dot_product_attention`` in the activation dtype. Presets:

- :func:`vla_trunk_config` — VLA-sized: d_model 2048, 16 heads, GELU MLP 8192, fused QKV, no
  biases; 6 layers = 302M parameters (≥ 300M), 20 layers ≈ 1.0B.
- :func:`wide_trunk_config` — 7B-VLA layer shapes (d 4096, MLP 11008); 2 layers = 315M.
- :func:`policy_trunk_config` — the reference policy's trunk shapes from
  ``daptq_ros.model.config.VLAConfig`` (d_model 192, separate q/k/v/o with biases, MLP ratio 4),
  or the same defaults hard-wired when that package is not importable.

Parameter counts are analytic (:meth:`TrunkConfig.param_count`), so the ≥ 300M claim is checked
without allocating anything.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrunkConfig:
    """Shape of a benchmark trunk.

    Args:
        name: label in tables and JSON.
        d_model: residual width.
        n_layers: transformer blocks.
        n_heads: attention heads (d_model must be divisible).
        ffn: MLP hidden width.
        fused_qkv: one (3·d, d) projection instead of three (d, d) ones.
        bias: Linears carry biases.
    """

    name: str = "trunk-302m"
    d_model: int = 2048
    n_layers: int = 6
    n_heads: int = 16
    ffn: int = 8192
    fused_qkv: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "ffn"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, out_features, in_features) of every Linear of one block."""
        d = self.d_model
        attn = [("qkv", 3 * d, d)] if self.fused_qkv else [("q", d, d), ("k", d, d), ("v", d, d)]
        return [*attn, ("o", d, d), ("fc1", self.ffn, d), ("fc2", d, self.ffn)]

    def linear_param_count(self) -> int:
        """Parameters in Linear weights and biases (what quantization touches, plus biases)."""
        per_block = sum(n * k + (n if self.bias else 0) for _, n, k in self.linear_shapes())
        return per_block * self.n_layers

    def param_count(self) -> int:
        """All parameters: Linears plus LayerNorm weights/biases (2 per block + the final one)."""
        norms = (2 * self.n_layers + 1) * 2 * self.d_model
        return self.linear_param_count() + norms

    def n_linears(self) -> int:
        """Linear layers in the whole trunk."""
        return len(self.linear_shapes()) * self.n_layers

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.param_count(), "linear_params": self.linear_param_count(),
                "n_linears": self.n_linears()}


def vla_trunk_config(n_layers: int = 6, name: str | None = None) -> TrunkConfig:
    """A VLA-sized trunk: d 2048, 16 heads, GELU MLP 8192, fused QKV (6 layers = 302M parameters)."""
    cfg = TrunkConfig(name="", d_model=2048, n_layers=n_layers, n_heads=16, ffn=8192, fused_qkv=True,
                      bias=False)
    label = name or f"trunk-{cfg.param_count() / 1e6:.0f}m"
    return TrunkConfig(**{**asdict(cfg), "name": label})


def wide_trunk_config(n_layers: int = 2, name: str | None = None) -> TrunkConfig:
    """A trunk with 7B-VLA layer shapes (OpenVLA/CogACT's Llama-2 width): d 4096, 32 heads, GELU
    MLP 11008, fused QKV; 2 layers = 315M parameters. Each Linear is 34-90 MB in bf16, so batch-1
    matmuls are bandwidth-bound rather than launch-bound (the d-2048 trunk's 8-34 MB are not)."""
    cfg = TrunkConfig(name="", d_model=4096, n_layers=n_layers, n_heads=32, ffn=11008, fused_qkv=True,
                      bias=False)
    label = name or f"trunk-{cfg.param_count() / 1e6:.0f}m-d4096"
    return TrunkConfig(**{**asdict(cfg), "name": label})


def policy_trunk_config() -> TrunkConfig:
    """The reference policy's trunk shapes (``VLAConfig`` defaults; d 192, 4 layers, 6 heads, MLP ×4)."""
    try:
        from daptq_ros.model.config import VLAConfig

        vc = VLAConfig()
        d, layers, heads, ratio = vc.d_model, vc.trunk_layers, vc.heads, vc.mlp_ratio
        source = "VLAConfig"
    except Exception as exc:
        log.warning("daptq_ros.model.config not importable (%s); using the d=192 stand-in", exc)
        d, layers, heads, ratio = 192, 4, 6, 4
        source = "stand-in"
    log.debug("policy trunk shapes from %s", source)
    return TrunkConfig(name="policy-trunk", d_model=d, n_layers=layers, n_heads=heads, ffn=d * ratio,
                       fused_qkv=False, bias=True)


class Block(nn.Module):
    """Pre-LN transformer block with swappable Linears."""

    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.fused_qkv = cfg.fused_qkv
        self.norm1 = nn.LayerNorm(d)
        if cfg.fused_qkv:
            self.qkv = nn.Linear(d, 3 * d, bias=cfg.bias)
        else:
            self.q = nn.Linear(d, d, bias=cfg.bias)
            self.k = nn.Linear(d, d, bias=cfg.bias)
            self.v = nn.Linear(d, d, bias=cfg.bias)
        self.o = nn.Linear(d, d, bias=cfg.bias)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) → (B, L, d)."""
        b, length, d = x.shape
        h = self.norm1(x)
        heads, dh = self.n_heads, d // self.n_heads
        if self.fused_qkv:
            q, k, v = self.qkv(h).view(b, length, 3, heads, dh).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (proj(h).view(b, length, heads, dh).transpose(1, 2)
                       for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, length, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Trunk(nn.Module):
    """Stack of :class:`Block` plus a final LayerNorm."""

    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, d) → normalized tokens (B, L, d)."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@torch.no_grad()
def build_trunk(cfg: TrunkConfig, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, std: float = 0.02) -> Trunk:
    """A :class:`Trunk` with random N(0, std²) Linear weights (and biases), allocated on ``device``.

    Weights are drawn directly on the device (a 1B-parameter trunk takes well under a second on
    a GPU); LayerNorms keep weight 1 and bias 0.
    """
    with torch.device("meta"):
        model = Trunk(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std, generator=gen)
            if module.bias is not None:
                module.bias.normal_(0.0, std, generator=gen)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
    return model.eval()
