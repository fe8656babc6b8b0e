"""Configuration of the reference VLA policy and of its training run.

Both are typed dataclasses loaded from YAML through :func:`daptq_ros.config_util.load_config`
(``config/model.yaml`` holds a ``model:`` and a ``train:`` section). Bad values raise
``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADS = ("flow", "regression")
CONFIG_VERSION = 1


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class VLAConfig:
    """Architecture of :class:`daptq_ros.model.vla.ReferenceVLA`.

    Args:
        version: config schema version (checked on checkpoint load).
        image_size: square input image side in pixels; must be divisible by 16 (conv stem stride).
        d_model: width of the vision-language trunk.
        heads: attention heads in the trunk and in the action head.
        trunk_layers: transformer blocks in the trunk.
        mlp_ratio: MLP hidden width as a multiple of the block width.
        readout_tokens: learned readout tokens whose trunk outputs condition the action head.
        lang_dim: width of the (frozen) instruction-encoder token features (MiniLM: 384).
        max_lang_tokens: instruction tokens per sample (padded / truncated).
        proprio_dim: proprioception size (hand xyz + gripper opening).
        action_dim: action size (dx, dy, dz, gripper).
        chunk_size: actions predicted per forward pass (H).
        head: ``"flow"`` (DiT flow-matching head) or ``"regression"`` (chunked L1 regression).
        head_layers: transformer blocks in the action head.
        head_dim: width of the action head and of the conditioning tokens z.
        flow_steps: Euler integration steps of the flow head at inference (training does not
            depend on it). 4 keeps the batch-1 CPU forward near 10 ms (GR00T N1 also uses 4).
        dropout: dropout in attention outputs and MLPs during training.
        stem_refine: extra stride-1 3x3 convs (with residual) after each of the stem's last three
            stride-2 convs; 0 = the plain 4-conv stem. Goal markers in Meta-World are 2-3 px,
            so the stem needs some depth at 32/16/8 px resolution to localize them.
        coord_channels: append normalized x/y coordinate channels to the image (CoordConv),
            which helps convolutional BC policies regress positions.
    """

    version: int = CONFIG_VERSION
    # vision-language trunk
    image_size: int = 128
    d_model: int = 192
    heads: int = 6
    trunk_layers: int = 4
    mlp_ratio: int = 4
    readout_tokens: int = 4
    # inputs
    lang_dim: int = 384
    max_lang_tokens: int = 16
    proprio_dim: int = 4
    action_dim: int = 4
    chunk_size: int = 8
    # action head
    head: str = "flow"
    head_layers: int = 3
    head_dim: int = 192
    flow_steps: int = 4
    dropout: float = 0.0
    # vision stem
    stem_refine: int = 0
    coord_channels: bool = False

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version must be {CONFIG_VERSION}, got {self.version}")
        for name in (
            "image_size",
            "d_model",
            "heads",
            "trunk_layers",
            "mlp_ratio",
            "readout_tokens",
            "lang_dim",
            "max_lang_tokens",
            "proprio_dim",
            "action_dim",
            "chunk_size",
            "head_layers",
            "head_dim",
            "flow_steps",
        ):
            _positive(name, getattr(self, name))
        if self.image_size % 16:
            raise ValueError(f"image_size must be divisible by 16 (conv stem stride), got {self.image_size}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if self.head_dim % self.heads:
            raise ValueError(f"head_dim={self.head_dim} must be divisible by heads={self.heads}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.stem_refine < 0:
            raise ValueError(f"stem_refine must be >= 0, got {self.stem_refine}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def vision_tokens(self) -> int:
        """Number of image tokens produced by the conv stem ((image_size / 16) ** 2)."""
        return (self.image_size // 16) ** 2

    @property
    def uses_noise(self) -> bool:
        """True when the forward pass takes a ``noise`` input (flow head)."""
        return self.head == "flow"


@dataclass
class TrainConfig:
    """Optimization settings of ``daptq train`` (command-line flags override some of them).

    Args:
        steps: optimizer steps.
        batch_size: frames per step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW decoupled weight decay (not applied to norms, biases, embeddings).
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: max global gradient norm (0 disables clipping).
        ema_decay: EMA decay of the weights used for validation and the checkpoint (0 disables).
        shift_pad: random-shift augmentation range in pixels (DrQ-style, 0 disables).
        val_fraction: fraction of each task's episodes held out for validation.
        val_every: steps between validation-loss evaluations.
        val_batches: validation batches per evaluation.
        log_every: steps between training-loss log lines.
        paraphrase_prob: probability of training on a paraphrase instead of the episode's own one.
        flow_samples: (noise, time) draws per frame in the flow-matching loss; the trunk runs once
            per frame and only the small head sees the repeats (lower-variance trunk gradients).
            Ignored by the regression head.
    """

    steps: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    shift_pad: int = 4
    val_fraction: float = 0.1
    val_every: int = 500
    val_batches: int = 8
    log_every: int = 100
    paraphrase_prob: float = 0.5
    flow_samples: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "val_batches", "log_every", "flow_samples"):
            _positive(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "shift_pad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "paraphrase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
