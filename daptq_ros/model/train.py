"""Behaviour-cloning training of the reference VLA on scripted demonstrations.

GPU-efficient by construction: the whole training split lives on the device as one uint8 image
tensor; batches are gathered, converted and augmented (random shift) there; the forward/backward
runs under bf16 autocast on CUDA; AdamW (fused on CUDA) with linear warm-up + cosine decay; an EMA
of the weights is validated and checkpointed. The same code runs a tiny smoke test on CPU (fp32).

Model selection: with ``eval_every`` > 0 and the simulator available, the EMA weights are
evaluated closed-loop (``daptq_ros.sim.evaluate``) on held-out selection seeds, and the
checkpoint with the best success rate is kept (ties → lower validation loss); otherwise the one
with the lowest validation loss. Runs are seeded; on CPU they are bit-reproducible, on CUDA up to
non-deterministic kernels.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from daptq_ros.config_util import to_dict
from daptq_ros.model.config import TrainConfig, VLAConfig
from daptq_ros.model.data import DemoDataset, DeviceData, split_summary
from daptq_ros.model.io import NormStats, load_checkpoint, save_checkpoint
from daptq_ros.model.language import InstructionCache
from daptq_ros.model.torch_policy import INSTRUCTIONS_FILE, resolve_device
from daptq_ros.model.vla import ReferenceVLA

logger = logging.getLogger(__name__)

SELECTION_SEED_START = 150_000
"""First layout seed of training-time closed-loop evaluation: disjoint from the demos (< 100_000)
and from the final evaluation seeds (100_000 + episodes), so selection does not bias the final
numbers."""


@dataclass
class TrainRun:
    """What one training run needs besides the configs.

    Args:
        demos: demo directory (``DIR/<task>/*.npz``).
        instructions: instruction cache (``.safetensors``) covering the demos' instructions.
        out: output checkpoint path (``.safetensors``); the cache is copied beside it as
            ``instructions.safetensors``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seeds the split, initialization, sampling, augmentation and flow noise.
        eval_every: steps between closed-loop evaluations (0: never; model selection by val loss).
        eval_episodes: episodes per task in each closed-loop evaluation.
        eval_workers: evaluation worker processes (None: min(16, CPU count)).
        eval_seed: first layout seed of the selection evaluations.
        eval_tasks: tasks evaluated (``"all"`` or comma-separated MT10 names).
        log_json: optional path of the JSON training log.
        command: the command line, stored in the checkpoint metadata.
        init: optional checkpoint to warm-start from (its config and norm stats are used).
        time_limit_s: stop the optimization loop after this many seconds (then validate/save);
            the cosine decay then follows elapsed time when that is ahead of the step count, so
            the run still ends annealed (learning rates then depend on timing: not bit-reproducible).
        compile: ``torch.compile`` the training loss with CUDA graphs; None = on CUDA only
            (about 3x faster steps on an H100, ~35 s of start-up).
    """

    demos: Path
    instructions: Path
    out: Path
    device: str = "auto"
    seed: int = 0
    eval_every: int = 0
    eval_episodes: int = 5
    eval_workers: int | None = None
    eval_seed: int = SELECTION_SEED_START
    eval_tasks: str = "all"
    log_json: Path | None = None
    command: str = ""
    init: Path | None = None
    time_limit_s: float | None = None
    compile: bool | None = None


def git_revision() -> str:
    """``git describe``-style revision of the package source (+ ``-dirty``), or ``DAPTQ_GIT_REV``."""
    if os.environ.get("DAPTQ_GIT_REV"):
        return os.environ["DAPTQ_GIT_REV"]
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, time_fraction: float = 0.0) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``.

    ``time_fraction`` (elapsed / time limit) advances the decay when it is ahead of the step
    count, so a run stopped by its time limit still ends annealed.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices/kernels only (not biases, norms, embeddings, learned tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith(("pos_emb", "_pos", "readout", "queries"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up of the decay (as in timm / TF): early averages do not drag the random init along.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def validate(
    model: ReferenceVLA, data: DeviceData, batch_size: int, n_batches: int, seed: int
) -> dict[str, float]:
    """Validation loss and action L1 (normalized units, sampled with fixed noise) on fixed frames."""
    model.eval()
    device = data.device
    g = torch.Generator().manual_seed(seed)
    n = min(len(data), batch_size * n_batches)
    order = torch.randperm(len(data), generator=g)[:n].to(device)
    losses, l1s, weights = [], [], []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = data.batch(idx, model.config.image_size)
            with _autocast(device):
                loss = model.loss(batch)["loss"].float()
                noise = torch.randn(len(idx), model.config.chunk_size, model.config.action_dim, device=device)
                pred = model(
                    batch["image"],
                    batch["lang_tokens"],
                    batch["lang_mask"],
                    batch["proprio"],
                    noise if model.config.uses_noise else None,
                ).float()
            valid = batch["action_valid"]
            l1 = ((pred - batch["actions"]).abs().mean(-1) * valid).sum() / valid.sum().clamp_min(1.0)
            losses.append(float(loss))
            l1s.append(float(l1))
            weights.append(len(idx))
    w = np.asarray(weights, dtype=np.float64)
    return {"val_loss": float(np.dot(losses, w) / w.sum()), "val_action_l1": float(np.dot(l1s, w) / w.sum())}


def _closed_loop_eval(
    model: ReferenceVLA,
    norm: NormStats,
    cache: InstructionCache,
    run: TrainRun,
) -> dict[str, Any] | None:
    """Success rate of ``model`` on held-out layouts via ``daptq_ros.sim.evaluate``; None if unavailable."""
    try:
        from daptq_ros.sim.evaluate import EvalConfig, evaluate
        from daptq_ros.sim.tasks import parse_tasks
    except ImportError as err:
        logger.warning("closed-loop evaluation unavailable (%s); selecting by validation loss", err)
        return None
    workers = run.eval_workers or min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="daptq_eval_") as tmp:
        ckpt = save_checkpoint(Path(tmp) / "policy.safetensors", model, norm)
        cache.save(Path(tmp) / INSTRUCTIONS_FILE)
        try:
            config = EvalConfig(
                tasks=tuple(parse_tasks(run.eval_tasks)),
                episodes=run.eval_episodes,
                seed=run.eval_seed,
                workers=workers,
            )
            result = evaluate(str(ckpt), config=config)
        except Exception as err:  # simulator missing / broken: training must go on
            logger.warning(
                "closed-loop evaluation failed (%s: %s); selecting by validation loss",
                type(err).__name__,
                err,
            )
            return None
    return {
        "success_rate": float(result["overall"]["success_rate"]),
        "per_task": {t: float(v["success_rate"]) for t, v in result["tasks"].items()},
        "wall_s": float(result["timing"]["wall_s"]),
    }


class Trainer:
    """One training run: data on the device, model + EMA + optimizer, loop, validation, selection.

    Use :func:`train`; the class only splits the run into readable steps.
    """

    def __init__(self, run: TrainRun, model_config: VLAConfig, train_config: TrainConfig) -> None:
        self.run, self.tc = run, train_config
        self.device = resolve_device(run.device)
        if run.eval_every > 0:
            try:
                from daptq_ros.sim.tasks import parse_tasks
            except ImportError:
                pass  # reported (and evaluation skipped) at the first evaluation
            else:
                parse_tasks(run.eval_tasks)  # fail fast on a bad task list, not after training
        torch.manual_seed(run.seed)
        np.random.seed(run.seed)
        self.cache = InstructionCache.load(run.instructions)
        init = load_checkpoint(run.init, device="cpu") if run.init else None
        if init is not None:
            logger.info("warm-starting from %s (its model config and norm stats are used)", run.init)
            model_config = init.config
        self.config = model_config
        self.dataset = DemoDataset(
            run.demos,
            self.cache,
            chunk_size=model_config.chunk_size,
            val_fraction=self.tc.val_fraction,
            seed=run.seed,
            norm=init.norm if init else None,
        )
        self.norm = self.dataset.norm
        t0 = time.perf_counter()
        self.train_data = self.dataset.to_device("train", self.device)
        self.val_data = self.dataset.to_device("val", self.device) if self.dataset.val_idx else None
        logger.info(
            "data on %s: %d train / %d val frames (%.1f s)",
            self.device,
            len(self.train_data),
            len(self.val_data) if self.val_data else 0,
            time.perf_counter() - t0,
        )
        self._build_model(init.model if init else ReferenceVLA(model_config))
        self.do_eval = run.eval_every > 0
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.meta_train = {
            "command": run.command,
            "seed": run.seed,
            "git": git_revision(),
            "device": str(self.device),
            "compiled": self.compiled,
            "torch": torch.__version__,
            "demos": str(run.demos),
            "train_config": to_dict(self.tc),
            "split": split_summary(self.dataset),
            "ema": self.ema is not None,
            "parameters": self.n_params,
        }

    def _build_model(self, model: ReferenceVLA) -> None:
        tc, device = self.tc, self.device
        self.model = model.to(device).train()
        self.n_params = sum(p.numel() for p in model.parameters())
        logger.info("model: %s head, %.2fM parameters", self.config.head, self.n_params / 1e6)
        self.ema = _EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
        self.opt = torch.optim.AdamW(
            _param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95), fused=device.type == "cuda"
        )
        self.time_fraction = 0.0  # elapsed / time limit, updated every step when a limit is set
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, tc.steps, tc.warmup_steps, tc.min_lr_ratio, self.time_fraction)
        )
        self.compiled = device.type == "cuda" if self.run.compile is None else self.run.compile
        self.loss_fn = functools.partial(model.loss, flow_samples=tc.flow_samples)
        if self.compiled:
            # CUDA graphs (reduce-overhead): the small model is launch-bound in eager mode. Measured
            # on an H100 at batch 256: eager 39 ms/step, compiled 13 ms/step after ~35 s compiling.
            self.loss_fn = torch.compile(
                self.loss_fn, mode="reduce-overhead" if device.type == "cuda" else None
            )
        self.gen = torch.Generator(device=device).manual_seed(self.run.seed)

    @property
    def eval_model(self) -> ReferenceVLA:
        """The weights that are validated and saved (the EMA when enabled)."""
        return self.ema.model if self.ema is not None else self.model

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the (device) loss."""
        tc = self.tc
        idx = torch.randint(0, len(self.train_data), (tc.batch_size,), device=self.device, generator=self.gen)
        batch = self.train_data.batch(idx, self.config.image_size, self.gen, tc.paraphrase_prob, tc.shift_pad)
        with _autocast(self.device):
            loss = self.loss_fn(batch)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        return loss.detach()

    def checkpoint_point(self, step: int, final: bool) -> None:
        """Validate (and evaluate closed-loop when due); save the weights if they are the best."""
        run = self.run
        entry: dict[str, Any] = {"step": step, "elapsed_s": round(time.perf_counter() - self.t_start, 1)}
        if self.val_data is not None:
            entry.update(
                validate(
                    self.eval_model, self.val_data, self.tc.batch_size, self.tc.val_batches, run.seed + 1
                )
            )
        if self.do_eval and (final or step % run.eval_every == 0):
            result = _closed_loop_eval(self.eval_model, self.norm, self.cache, run)
            self.do_eval = result is not None
            if result is not None:
                entry["eval"] = result
        self.model.train()
        self.history.append(entry)
        shown = {k: v for k, v in entry.items() if k != "eval"}
        if "eval" in entry:
            shown["success"] = entry["eval"]["success_rate"]
        logger.info("step %d: %s", step, shown)
        key = _selection_key(entry, self.do_eval, final)
        if key is None or (self.best is not None and key <= self.best["key"]):
            return
        self.best = {"key": key, "step": step, **{k: v for k, v in entry.items() if k != "step"}}
        train_meta = {
            **self.meta_train,
            "step": step,
            "steps": self.tc.steps,
            "selected_by": "eval_success" if "eval" in entry else "val_loss",
            **{k: v for k, v in entry.items() if k in ("val_loss", "val_action_l1")},
            "eval_success": entry.get("eval", {}).get("success_rate"),
        }
        save_checkpoint(
            run.out,
            self.eval_model,
            self.norm,
            {"instructions": self.dataset.instructions, "train": train_meta},
        )

    def fit(self) -> dict[str, Any]:
        """Run the loop; returns the summary (see :func:`train`)."""
        tc, run = self.tc, self.run
        self.t_start = time.perf_counter()
        running, n_running = torch.zeros((), device=self.device), 0
        t_mark, frames_mark = time.perf_counter(), 0  # throughput interval (excludes validation/eval)
        t_opt, frames_done, step = 0.0, 0, 0
        bar = tqdm(total=tc.steps, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
        for step in range(1, tc.steps + 1):
            running += self.step(step)
            n_running += 1
            frames_mark += tc.batch_size
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                train_loss = float(running) / n_running  # the loop's only host sync
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss became {train_loss} before step {step}")
                now = time.perf_counter()
                fps = frames_mark / max(now - t_mark, 1e-9)
                t_opt, frames_done = t_opt + now - t_mark, frames_done + frames_mark
                self.history.append(
                    {
                        "step": step,
                        "train_loss": train_loss,
                        "lr": self.sched.get_last_lr()[0],
                        "frames_per_s": fps,
                    }
                )
                bar.set_postfix(loss=f"{train_loss:.4f}", fps=f"{fps:.0f}")
                running.zero_()
                n_running, t_mark, frames_mark = 0, now, 0
            if run.time_limit_s is not None:
                self.time_fraction = (time.perf_counter() - self.t_start) / run.time_limit_s
            if self.time_fraction > 1.0:
                logger.warning("time limit %.0f s reached at step %d of %d", run.time_limit_s, step, tc.steps)
                break
            if step < tc.steps and (
                step % tc.val_every == 0 or (self.do_eval and step % run.eval_every == 0)
            ):
                paused = time.perf_counter()
                self.checkpoint_point(step, final=False)
                t_mark += time.perf_counter() - paused
        bar.close()
        self.checkpoint_point(step, final=True)
        return {
            "checkpoint": str(run.out),
            "best": {k: v for k, v in (self.best or {}).items() if k != "key"},
            "steps_done": step,
            "parameters": self.n_params,
            "device": str(self.device),
            "frames_per_s": frames_done / max(t_opt, 1e-9),
            "wall_s": time.perf_counter() - self.t_start,
            "history": self.history,
            "train": self.meta_train,
        }


def train(run: TrainRun, model_config: VLAConfig, train_config: TrainConfig) -> dict[str, Any]:
    """Train, validate, select and save the reference VLA; returns the training summary.

    The summary (also written to ``run.log_json``) holds the history of train/val losses and
    evaluations, the selected step and checkpoint, and throughput (frames/s, excluding
    validation and evaluation time). ``instructions.safetensors`` is copied beside the checkpoint.
    """
    summary = Trainer(run, model_config, train_config).fit()
    if Path(run.instructions).resolve() != (run.out.parent / INSTRUCTIONS_FILE).resolve():
        shutil.copyfile(run.instructions, run.out.parent / INSTRUCTIONS_FILE)
    logger.info(
        "done: %d steps, %.0f frames/s, best step %s -> %s",
        summary["steps_done"],
        summary["frames_per_s"],
        summary["best"].get("step"),
        run.out,
    )
    if run.log_json:
        Path(run.log_json).parent.mkdir(parents=True, exist_ok=True)
        Path(run.log_json).write_text(json.dumps(summary, indent=2))
    return summary


def _selection_key(entry: dict[str, Any], eval_active: bool, final: bool) -> tuple[float, ...] | None:
    """Ordering key of a checkpoint candidate (higher is better), or None if it is not one.

    Evaluated candidates rank by (success, -val loss) above all others; while evaluation is
    active, unevaluated points are not candidates. Without evaluation: -val loss. Without either,
    only the final weights are a candidate.
    """
    neg_val = -entry["val_loss"] if "val_loss" in entry else 0.0
    if "eval" in entry:
        return (1.0, entry["eval"]["success_rate"], neg_val)
    if eval_active and not final:
        return None
    if "val_loss" in entry:
        return (0.0, 0.0, neg_val)
    return (0.0, 0.0, 0.0) if final else None
