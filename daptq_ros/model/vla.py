"""The reference vision-language-action policy (a small CogACT / π0-style VLA).

Data flow (see the Model I/O contract in ``docs/architecture.md``)::

    image (B,3,S,S) ──vision── 64 tokens ┐
    lang_tokens (B,16,384) ──lang_proj── ├─ trunk (pre-LN transformer, padding-masked) ─ readout
    proprio (B,4) ──proprio_proj── token ┘            + learned readout tokens
    readout outputs ──vl_action_interface── z (B,R,head_dim)        (the VL → action interface)
    z (+ noise) ──action_head── actions (B,H,A)   (DiT flow-matching head, or chunked regression)

Every projection is an explicit ``nn.Linear`` / ``nn.Conv2d`` (no ``nn.MultiheadAttention``), so
forward hooks see all quantizable layers. The flow head integrates a fixed number of Euler steps
from the given noise: deterministic for a given noise tensor and ONNX-exportable (the loop
unrolls; there is no data-dependent control flow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from daptq_ros.model.config import VLAConfig

# Additive attention bias for padded language tokens. exp(-1e4) underflows to exactly 0 in
# float32/bfloat16, so padded keys contribute nothing; finite (not -inf) keeps ONNX NaN-free.
_MASK_BIAS = -1.0e4


class Attention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/o projections (hook- and quant-friendly)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        n_queries: int | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` (B, L, D).

        Args:
            x: input tokens.
            attn_bias: additive bias broadcastable to (B, heads, L_queries, L_keys).
            prefix_kv: optional (k, v) of extra prefix tokens, each (B, heads, P, D/heads), that
                every token of ``x`` also attends to (see :meth:`prefix`).
            n_queries: when set, only the last ``n_queries`` tokens query (all tokens are keys);
                the output then has ``n_queries`` tokens.
        """
        queries = x if n_queries is None else x[:, -n_queries:]
        q = self._split(self.q_proj(queries))
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[0], k], dim=2)
            v = torch.cat([prefix_kv[1], v], dim=2)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
        )
        b, length, dim = queries.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, length, dim))

    def prefix(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of prefix ``tokens`` (B, P, D), computed once and reused (KV cache)."""
        return self._split(self.k_proj(tokens)), self._split(self.v_proj(tokens))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        return x.reshape(b, length, self.heads, dim // self.heads).transpose(1, 2)


class MLP(nn.Module):
    """Two-layer GELU MLP (``fc1`` → GELU → ``fc2``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dim * mlp_ratio, dropout)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, n_queries: int | None = None
    ) -> torch.Tensor:
        """Update ``x`` (B, L, D); with ``n_queries`` only the last tokens are updated and returned."""
        attn = self.attn(self.norm1(x), attn_bias, n_queries=n_queries)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout, training=True)
        x = (x if n_queries is None else x[:, -n_queries:]) + attn
        return x + self.mlp(self.norm2(x))


class VisionStem(nn.Module):
    """Conv stem: (B,3,S,S) in [0,1] → (B,(S/16)², d) tokens with learned position embeddings.

    Four stride-2 3x3 convs (``conv1..conv4``); with ``stem_refine > 0`` each of the last three
    stages also gets ``stem_refine`` residual stride-1 convs (``refine{stage}_{i}``), and with
    ``coord_channels`` two constant x/y coordinate planes are appended to the input.
    """

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        chans = (3, 32, 64, 128, config.d_model)
        in_chans = chans[0] + (2 if config.coord_channels else 0)
        self.coord_channels = config.coord_channels
        self.stem_refine = config.stem_refine
        self.conv1 = nn.Conv2d(in_chans, chans[1], 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(chans[1], chans[2], 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(chans[2], chans[3], 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(chans[3], chans[4], 3, stride=2, padding=1)
        for stage, width in ((2, chans[2]), (3, chans[3]), (4, chans[4])):
            for i in range(config.stem_refine):
                self.add_module(f"refine{stage}_{i}", nn.Conv2d(width, width, 3, stride=1, padding=1))
        if config.coord_channels:
            lin = torch.linspace(-1.0, 1.0, config.image_size)
            yy, xx = torch.meshgrid(lin, lin, indexing="ij")
            self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.vision_tokens, config.d_model))

    def _refine(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        for i in range(self.stem_refine):
            x = x + F.gelu(getattr(self, f"refine{stage}_{i}")(x), approximate="tanh")
        return x

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - 0.5) * 4.0  # [0,1] → roughly zero-mean, unit-scale input
        if self.coord_channels:
            x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        x = F.gelu(self.conv1(x), approximate="tanh")
        x = self._refine(F.gelu(self.conv2(x), approximate="tanh"), 2)
        x = self._refine(F.gelu(self.conv3(x), approximate="tanh"), 3)
        x = self._refine(self.conv4(x), 4)
        return x.flatten(2).transpose(1, 2) + self.pos_emb


class Trunk(nn.Module):
    """The vision-language transformer: ``blocks`` + final ``norm``.

    Only the readout tokens leave the trunk, so the last block updates only them (their queries
    attend to all tokens); the result is identical to running the full last block and slicing.
    """

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.trunk_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, n_out: int) -> torch.Tensor:
        """Tokens (B, L, d) → normalized outputs of the last ``n_out`` tokens (B, n_out, d)."""
        for block in self.blocks[:-1]:
            x = block(x, attn_bias)
        return self.norm(self.blocks[-1](x, attn_bias, n_queries=n_out))


class VLActionInterface(nn.Module):
    """Trunk readout outputs (B,R,d_model) → head conditioning tokens z (B,R,head_dim).

    ``fc1`` → GELU → ``fc2`` (its input is already normalized by ``trunk.norm``). These two Linears
    are the VL → action interface that DA-PTQ's cross-space compensation targets; ``fc2`` is the
    last op before the head, so a per-channel gain/offset on z folds exactly into its weight/bias.
    """

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.head_dim)
        self.fc2 = nn.Linear(config.head_dim, config.head_dim)

    def forward(self, readout: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(readout), approximate="tanh"))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow times ``t`` (N,) in [0,1] → (N, dim) (DiT convention, t×1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale1p: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; ``scale1p`` already holds ``1 + scale``."""
    return torch.addcmul(shift[:, None], x, scale1p[:, None])


class DiTBlock(nn.Module):
    """DiT block with adaLN-zero over noisy action tokens that also attend to a fixed prefix.

    The conditioning tokens z form a prefix whose keys/values (``attn.k_proj``/``attn.v_proj`` of
    ``norm1(z)``) are computed once per forward and reused at every flow step (π0-style KV cache).
    ``adaln`` maps the conditioning vector c (timestep + pooled z) to shift/scale/gate of the
    attention and MLP branches; it is zero-initialized so each block starts as the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = MLP(dim, dim * mlp_ratio, dropout)
        self.adaln = nn.Linear(dim, 6 * dim)

    def prefix(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys/values of the conditioning tokens ``z`` (B, R, D)."""
        return self.attn.prefix(self.norm1(z))

    def forward(
        self, x: torch.Tensor, prefix_kv: tuple[torch.Tensor, torch.Tensor], modulation: torch.Tensor
    ) -> torch.Tensor:
        """Update action tokens ``x`` (B, H, D) given the prefix KV and ``adaln(silu(c))`` (B, 6D),
        with 1 already added to its two scale slices (see :meth:`FlowHead._prepare`)."""
        shift1, scale1p, gate1, shift2, scale2p, gate2 = modulation.chunk(6, dim=-1)
        x = torch.addcmul(
            x, gate1[:, None], self.attn(_modulate(self.norm1(x), shift1, scale1p), prefix_kv=prefix_kv)
        )
        return torch.addcmul(x, gate2[:, None], self.mlp(_modulate(self.norm2(x), shift2, scale2p)))


class FlowHead(nn.Module):
    """DiT-style flow-matching action head: noisy action tokens attend to [z; action tokens].

    Rectified flow: x_t = (1 - t)·noise + t·actions with velocity target actions - noise.
    Inference integrates ``flow_steps`` Euler steps from t=0 (noise) to t=1 (actions). Everything
    that does not depend on x (prefix KV of z, timestep embeddings of the fixed step times and the
    adaLN modulations) is computed once before the loop, in a few batched calls.
    """

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        dim = config.head_dim
        self.steps = config.flow_steps
        self.chunk_size = config.chunk_size
        self.action_in = nn.Linear(config.action_dim, dim)
        self.action_pos = nn.Parameter(torch.zeros(1, config.chunk_size, dim))
        self.cond_pos = nn.Parameter(torch.zeros(1, config.readout_tokens, dim))
        self.time_fc1 = nn.Linear(dim, dim)
        self.time_fc2 = nn.Linear(dim, dim)
        self.cond_pool = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.head_layers)
        )
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final_adaln = nn.Linear(dim, 2 * dim)
        self.final = nn.Linear(dim, config.action_dim)
        # constant 1 on the "scale" slices of the modulations ([shift, scale, gate] x 2 / [shift, scale])
        one, zero = torch.ones(dim), torch.zeros(dim)
        self.register_buffer(
            "block_scale_offset", torch.cat([zero, one, zero, zero, one, zero]), persistent=False
        )
        self.register_buffer("final_scale_offset", torch.cat([zero, one]), persistent=False)

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Flow times ``t`` (N,) → time embeddings (N, D) (sinusoid → ``time_fc1`` → SiLU → ``time_fc2``)."""
        temb = timestep_embedding(t, self.time_fc1.in_features)
        return self.time_fc2(F.silu(self.time_fc1(temb)))

    def _prepare(self, z: torch.Tensor, temb: torch.Tensor) -> tuple[list, list[torch.Tensor], torch.Tensor]:
        """Everything independent of the noisy actions: prefix KV and adaLN modulations.

        Args:
            z: conditioning tokens (B, R, D).
            temb: time embeddings (B or 1, N, D); N = 1 in training, N = flow steps at inference.

        Returns:
            per-block prefix (k, v), per-block modulations (B, N, 6D), final modulation (B, N, 2D).
        """
        c = F.silu(temb.to(z.dtype) + self.cond_pool(z.mean(dim=1))[:, None])
        cond = z + self.cond_pos
        prefix = [block.prefix(cond) for block in self.blocks]
        # + 1 on the scale slices here, once, instead of in every modulation of every flow step
        mods = [block.adaln(c) + self.block_scale_offset for block in self.blocks]
        return prefix, mods, self.final_adaln(c) + self.final_scale_offset

    def _velocity(
        self, x: torch.Tensor, prefix: list, mods: list[torch.Tensor], final_mod: torch.Tensor, step: int
    ) -> torch.Tensor:
        h = self.action_in(x) + self.action_pos
        for block, kv, mod in zip(self.blocks, prefix, mods, strict=True):
            h = block(h, kv, mod[:, step])
        shift, scale1p = final_mod[:, step].chunk(2, dim=-1)
        return self.final(_modulate(self.final_norm(h), shift, scale1p))

    def predict(self, z: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Integrate the flow from ``noise`` (B,H,A) to actions with fixed Euler steps."""
        if noise is None:
            raise ValueError("the flow head needs a noise input of shape (B, H, action_dim)")
        dt = 1.0 / self.steps
        times = torch.arange(self.steps, dtype=torch.float32, device=z.device) * dt
        prefix, mods, final_mod = self._prepare(z, self._time_embedding(times)[None])
        x = noise.to(z.dtype)
        for i in range(self.steps):
            x = x + dt * self._velocity(x, prefix, mods, final_mod, i)
        return x

    def loss(
        self, z: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor, samples: int = 1
    ) -> dict[str, torch.Tensor]:
        """Flow-matching velocity MSE over valid chunk steps, at random times t.

        ``samples`` (noise, t) draws are taken per frame: ``z`` is repeated for the head only.
        """
        if samples > 1:
            z, actions, valid = (x.repeat_interleave(samples, dim=0) for x in (z, actions, valid))
        b = actions.shape[0]
        # π0's time sampling: emphasize noisier times (t near 0): t = 0.999·(1 - u), u ~ Beta(1.5, 1).
        u = torch.rand(b, device=actions.device).pow(1.0 / 1.5)
        t = 0.999 * (1.0 - u)
        noise = torch.randn_like(actions)
        x_t = (1.0 - t)[:, None, None] * noise + t[:, None, None] * actions
        prefix, mods, final_mod = self._prepare(z, self._time_embedding(t)[:, None])
        v = self._velocity(x_t.to(z.dtype), prefix, mods, final_mod, 0).float()
        err = ((v - (actions - noise)) ** 2).mean(-1)
        loss = (err * valid).sum() / valid.sum().clamp_min(1.0)
        return {"loss": loss, "flow_mse": loss.detach()}


class RegressionHead(nn.Module):
    """Chunked regression head: learned action queries attend over z; L1 loss."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        dim = config.head_dim
        self.chunk_size = config.chunk_size
        self.queries = nn.Parameter(torch.zeros(1, config.chunk_size, dim))
        self.cond_pos = nn.Parameter(torch.zeros(1, config.readout_tokens, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.head_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.final = nn.Linear(dim, config.action_dim)

    def predict(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Action chunk (B,H,A) from conditioning tokens ``z``; ``noise`` is ignored."""
        h = torch.cat([z + self.cond_pos, self.queries.expand(z.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.final(self.norm(h[:, -self.chunk_size :]))

    def loss(
        self, z: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor, samples: int = 1
    ) -> dict[str, torch.Tensor]:
        """L1 over valid chunk steps (``samples`` is ignored: the head is deterministic)."""
        err = (self.predict(z).float() - actions).abs().mean(-1)
        loss = (err * valid).sum() / valid.sum().clamp_min(1.0)
        return {"loss": loss, "l1": loss.detach()}


class ReferenceVLA(nn.Module):
    """The reference VLA policy; inputs and outputs follow the Model I/O contract."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.vision = VisionStem(config)
        self.lang_proj = nn.Linear(config.lang_dim, d)
        self.lang_pos = nn.Parameter(torch.zeros(1, config.max_lang_tokens, d))
        self.proprio_proj = nn.Linear(config.proprio_dim, d)
        self.proprio_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.readout = nn.Parameter(torch.zeros(1, config.readout_tokens, d))
        self.trunk = Trunk(config)
        self.vl_action_interface = VLActionInterface(config)
        self.action_head: FlowHead | RegressionHead = (
            FlowHead(config) if config.head == "flow" else RegressionHead(config)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith(("pos_emb", "_pos", "readout", "queries")):
                nn.init.trunc_normal_(param, std=0.02)
        if isinstance(self.action_head, FlowHead):  # adaLN-zero: blocks start as identity (DiT)
            for block in self.action_head.blocks:
                nn.init.zeros_(block.adaln.weight)
                nn.init.zeros_(block.adaln.bias)
            for layer in (self.action_head.final_adaln, self.action_head.final):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Forward input names in order (``noise`` only for the flow head)."""
        base = ("image", "lang_tokens", "lang_mask", "proprio")
        return (*base, "noise") if self.config.uses_noise else base

    def _check_inputs(
        self, image: torch.Tensor, lang_tokens: torch.Tensor, lang_mask: torch.Tensor, proprio: torch.Tensor
    ) -> None:
        cfg = self.config
        expected = {
            "image": (image, (3, cfg.image_size, cfg.image_size)),
            "lang_tokens": (lang_tokens, (cfg.max_lang_tokens, cfg.lang_dim)),
            "lang_mask": (lang_mask, (cfg.max_lang_tokens,)),
            "proprio": (proprio, (cfg.proprio_dim,)),
        }
        for name, (tensor, tail) in expected.items():
            if tuple(tensor.shape[1:]) != tail or tensor.dim() != len(tail) + 1:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, expected (B, {', '.join(map(str, tail))})"
                )

    def encode_condition(
        self, image: torch.Tensor, lang_tokens: torch.Tensor, lang_mask: torch.Tensor, proprio: torch.Tensor
    ) -> torch.Tensor:
        """Run vision, language, proprio and the trunk; return head conditioning z (B,R,head_dim)."""
        self._check_inputs(image, lang_tokens, lang_mask, proprio)
        b = image.shape[0]
        mask = lang_mask.to(lang_tokens.dtype)
        vis = self.vision(image)
        lang = self.lang_proj(lang_tokens * mask[..., None]) + self.lang_pos
        prop = self.proprio_proj(proprio)[:, None] + self.proprio_pos
        tokens = torch.cat([vis, lang, prop, self.readout.expand(b, -1, -1)], dim=1)
        n_vis, n_rest = vis.shape[1], 1 + self.readout.shape[1]
        key_bias = torch.cat(
            [mask.new_zeros(b, n_vis), (1.0 - mask) * _MASK_BIAS, mask.new_zeros(b, n_rest)], dim=1
        )
        readout = self.trunk(tokens, key_bias[:, None, None, :], self.config.readout_tokens)
        return self.vl_action_interface(readout)

    def forward(
        self,
        image: torch.Tensor,
        lang_tokens: torch.Tensor,
        lang_mask: torch.Tensor,
        proprio: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized action chunk (B,H,A).

        Args:
            image: (B,3,S,S) RGB in [0,1].
            lang_tokens: (B,L,lang_dim) instruction token features, zero-padded.
            lang_mask: (B,L) 1 for valid tokens, 0 for padding.
            proprio: (B,proprio_dim) normalized proprioception.
            noise: (B,H,A) initial flow noise (flow head). When None, the flow head draws it from
                torch's global generator; the regression head ignores it.
        """
        z = self.encode_condition(image, lang_tokens, lang_mask, proprio)
        if isinstance(self.action_head, FlowHead):
            if noise is None:
                noise = torch.randn(
                    image.shape[0], self.config.chunk_size, self.config.action_dim, device=image.device
                )
            elif tuple(noise.shape[1:]) != (self.config.chunk_size, self.config.action_dim):
                raise ValueError(
                    f"noise has shape {tuple(noise.shape)}, expected "
                    f"(B, {self.config.chunk_size}, {self.config.action_dim})"
                )
        return self.action_head.predict(z, noise)

    def loss(self, batch: Mapping[str, torch.Tensor], flow_samples: int = 1) -> dict[str, torch.Tensor]:
        """Training loss on a batch with ``image``, ``lang_tokens``, ``lang_mask``, ``proprio``,
        ``actions`` (B,H,A normalized) and ``action_valid`` (B,H); returns ``{"loss": ..., ...}``.
        ``flow_samples``: noise draws per frame for the flow head (see ``TrainConfig``)."""
        missing = [k for k in ("image", "lang_tokens", "lang_mask", "proprio", "actions") if k not in batch]
        if missing:
            raise KeyError(f"training batch lacks {missing}")
        actions = batch["actions"].float()
        valid = batch.get("action_valid")
        valid = torch.ones(actions.shape[:2], device=actions.device) if valid is None else valid.float()
        z = self.encode_condition(batch["image"], batch["lang_tokens"], batch["lang_mask"], batch["proprio"])
        return self.action_head.loss(z, actions, valid, flow_samples)

    def example_inputs(self, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs matching the Model I/O contract (for export, tests and benchmarks).

        The language mask marks the first 8 tokens valid (the rest padding, zeroed).
        """
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        n_valid = min(8, cfg.max_lang_tokens)
        mask = torch.zeros(batch_size, cfg.max_lang_tokens)
        mask[:, :n_valid] = 1.0
        inputs = {
            "image": torch.rand(batch_size, 3, cfg.image_size, cfg.image_size, generator=g),
            "lang_tokens": torch.randn(batch_size, cfg.max_lang_tokens, cfg.lang_dim, generator=g)
            * mask[..., None],
            "lang_mask": mask,
            "proprio": torch.randn(batch_size, cfg.proprio_dim, generator=g),
        }
        if cfg.uses_noise:
            inputs["noise"] = torch.randn(batch_size, cfg.chunk_size, cfg.action_dim, generator=g)
        device = next(self.parameters()).device
        return {k: v.to(device) for k, v in inputs.items()}
