"""Open-loop replay of recorded frames through a reference and a candidate StepPolicy.

Both policies see the same observation and the same flow-head noise per frame (drawn from
``default_rng([seed, frame.index])`` as :func:`daptq_ros.runtime.onnx_policy.draw_noise` does),
so every difference comes from the policies themselves. Each frame yields a full chunk from
both; the executed actions are then derived per episode with the robot's chunk-execution rule
(:class:`~daptq_ros.runtime.chunking.ChunkExecutor`), independently for the two policies.

The two policies run concurrently in two threads (ONNX Runtime releases the GIL), which on a
2-core machine nearly halves the replay time of per-frame (batch-1) artifacts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from daptq_ros.drift.bag_io import Frame
from daptq_ros.policy_api import Observation, StepPolicy
from daptq_ros.runtime.chunking import ChunkExecutor, ChunkingConfig

logger = logging.getLogger(__name__)


class ReplayError(RuntimeError):
    """The two policies cannot be compared (shapes differ, a prediction failed)."""


@dataclass
class ReplayResult:
    """Everything a drift report needs from one replay (N frames, chunk H, A action dims).

    Attributes:
        t_ns: (N,) frame times (bag log time).
        episode: (N,) episode index per frame.
        instructions: instruction of each episode, by episode index.
        proprio: (N, P) recorded proprio.
        reference_chunks / candidate_chunks: (N, H, A) raw predicted chunks.
        reference_actions / candidate_actions: (N, A) executed actions (chunking rule applied).
        recorded_commands: (N, C) recorded command vectors, or None when any frame lacks one.
        seconds: wall time of the replay loop.
    """

    t_ns: np.ndarray
    episode: np.ndarray
    instructions: dict[int, str]
    proprio: np.ndarray
    reference_chunks: np.ndarray
    candidate_chunks: np.ndarray
    reference_actions: np.ndarray
    candidate_actions: np.ndarray
    recorded_commands: np.ndarray | None
    seconds: float
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.t_ns.shape[0])

    @property
    def t_s(self) -> np.ndarray:
        """Seconds since the first frame."""
        return (self.t_ns - self.t_ns[0]).astype(np.float64) * 1e-9 if self.n_frames else np.zeros(0)


def frame_noise(seed: int, index: int, chunk_size: int, action_dim: int) -> np.ndarray:
    """The flow-head noise of frame ``index`` (chunk_size, action_dim) float32, shared by both policies."""
    rng = np.random.default_rng([int(seed), int(index)])
    return rng.standard_normal((chunk_size, action_dim)).astype(np.float32)


def executed_actions(chunks: np.ndarray, episode: np.ndarray, chunking: ChunkingConfig) -> np.ndarray:
    """Actions (N, A) a chunk executor would run when chunk i is what the policy predicts at frame i."""
    chunks = np.asarray(chunks, dtype=np.float32)
    n, h, a = chunks.shape
    out = np.zeros((n, a), dtype=np.float32)
    executor = ChunkExecutor(h, chunking)
    for i in range(n):
        if i == 0 or episode[i] != episode[i - 1]:
            executor.reset()
        out[i] = executor.step(lambda i=i: chunks[i])
    return out


def _check_chunk(name: str, chunk: np.ndarray, expected: tuple[int, int] | None, index: int) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim != 2 or (expected is not None and chunk.shape != expected):
        raise ReplayError(
            f"{name} policy returned a chunk of shape {chunk.shape} at frame {index}, "
            f"expected {expected or '(H, A)'}"
        )
    if not np.all(np.isfinite(chunk)):
        raise ReplayError(f"{name} policy returned non-finite actions at frame {index}")
    return chunk


def replay(
    frames: Iterable[Frame],
    reference: StepPolicy,
    candidate: StepPolicy,
    action_dim: int,
    chunking: ChunkingConfig | None = None,
    seed: int = 0,
    max_frames: int | None = None,
    total: int | None = None,
    parallel: bool = True,
    progress: bool = True,
) -> ReplayResult:
    """Replay ``frames`` open loop through both policies.

    Args:
        frames: synchronized frames in time order (e.g. :class:`~daptq_ros.drift.bag_io.BagFrames`).
        reference: the full-precision policy.
        candidate: the quantized policy.
        action_dim: action size A (noise shape (H, A)).
        chunking: chunk-execution rule for the executed actions (default: execute 4, re-plan).
        seed: base seed of the per-frame noise.
        max_frames: stop after this many frames.
        total: expected frame count (progress bar only).
        parallel: run the two policies concurrently in two threads.
        progress: show a tqdm bar on stderr.

    Raises:
        ReplayError: chunk sizes differ, a policy returns a bad chunk, or no frame was replayed.
    """
    chunking = chunking or ChunkingConfig()
    h = int(reference.chunk_size)
    if int(candidate.chunk_size) != h:
        raise ReplayError(f"chunk sizes differ: reference {h}, candidate {candidate.chunk_size}")
    shape = (h, int(action_dim))
    t_ns, episode, proprio, cmds = [], [], [], []
    ref_chunks, cand_chunks = [], []
    instructions: dict[int, str] = {}
    current: tuple[int, str] | None = None
    limit = max_frames if max_frames is not None else total
    bar = tqdm(total=limit, desc="drift replay", unit="frame", disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="candidate") if parallel else None
    start = time.perf_counter()
    try:
        for frame in frames:
            if max_frames is not None and len(t_ns) >= max_frames:
                break
            key = (frame.episode, frame.instruction)
            if key != current:
                episode_seed = int(seed) * 100_003 + frame.episode
                reference.reset(frame.instruction, episode_seed)
                candidate.reset(frame.instruction, episode_seed)
                instructions.setdefault(frame.episode, frame.instruction)
                current = key
            obs = Observation(image=frame.image, proprio=frame.proprio)
            noise = frame_noise(seed, frame.index, *shape)
            if pool is not None:
                future = pool.submit(candidate.predict_chunk, obs, noise)
                ref = reference.predict_chunk(obs, noise)
                cand = future.result()
            else:
                ref = reference.predict_chunk(obs, noise)
                cand = candidate.predict_chunk(obs, noise)
            ref_chunks.append(_check_chunk("reference", ref, shape, frame.index))
            cand_chunks.append(_check_chunk("candidate", cand, shape, frame.index))
            t_ns.append(frame.t_ns)
            episode.append(frame.episode)
            proprio.append(frame.proprio)
            cmds.append(frame.command)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True)
    seconds = time.perf_counter() - start
    if not t_ns:
        raise ReplayError("no frame was replayed")
    ep = np.asarray(episode, dtype=np.int64)
    ref_arr, cand_arr = np.stack(ref_chunks), np.stack(cand_chunks)
    have_cmds = all(c is not None for c in cmds) and len({c.shape for c in cmds}) == 1
    logger.info(
        "replayed %d frames (%d episodes) in %.1f s (%.1f ms/frame)",
        len(t_ns),
        len(instructions),
        seconds,
        1e3 * seconds / len(t_ns),
    )
    return ReplayResult(
        t_ns=np.asarray(t_ns, dtype=np.int64),
        episode=ep,
        instructions=instructions,
        proprio=np.stack(proprio).astype(np.float32),
        reference_chunks=ref_arr,
        candidate_chunks=cand_arr,
        reference_actions=executed_actions(ref_arr, ep, chunking),
        candidate_actions=executed_actions(cand_arr, ep, chunking),
        recorded_commands=np.stack(cmds).astype(np.float32) if have_cmds else None,
        seconds=seconds,
        meta={"ms_per_frame": 1e3 * seconds / len(t_ns)},
    )
