"""Open-loop replay of recorded frames through a reference and a candidate StepPolicy.

Both policies see the same observation and the same flow-head noise per frame (drawn from
``default_rng([seed, frame.index])`` as :func:`daptq_ros.runtime.onnx_policy.draw_noise` does),
so every difference comes from the policies themselves. Chunks are predicted where the robot
would re-plan (or at every frame) and the executed actions follow the robot's chunk-execution
rule (:class:`~daptq_ros.runtime.chunking.ChunkExecutor`), independently for the two policies.

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
        reference_chunks / candidate_chunks: (M, H, A) raw chunks predicted at the queried frames
            (re-plan frames, or every frame; see :func:`replay`).
        reference_actions / candidate_actions: (N, A) executed actions (chunking rule applied).
        recorded_commands: (N, C) recorded command vectors (NaN rows for frames without one), or
            None when no frame has one or their sizes differ.
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
    every_frame: bool = False,
    parallel: bool = True,
    progress: bool = True,
) -> ReplayResult:
    """Replay ``frames`` open loop through both policies.

    In ``execute`` chunking mode the policies are queried only where the robot would re-plan
    (every ``execute_steps`` frames from each episode start), which is all the executed actions
    depend on; ``every_frame`` queries every frame (denser chunk statistics, ``execute_steps``
    times slower). ``ensemble`` mode always queries every frame.

    Args:
        frames: synchronized frames in time order (e.g. :class:`~daptq_ros.drift.bag_io.BagFrames`).
        reference: the full-precision policy.
        candidate: the quantized policy.
        action_dim: action size A (noise shape (H, A)).
        chunking: chunk-execution rule for the executed actions (default: execute 4, re-plan).
        seed: base seed of the per-frame noise.
        max_frames: stop after this many frames.
        total: expected frame count (progress bar only).
        every_frame: predict a chunk at every frame, not only at re-plan frames.
        parallel: run the two policies concurrently in two threads.
        progress: show a tqdm bar on stderr.

    Raises:
        ReplayError: chunk sizes differ, a policy returns a bad chunk, or no frame was replayed.
    """
    chunking = chunking or ChunkingConfig()
    h = int(reference.chunk_size)
    if int(candidate.chunk_size) != h:
        raise ReplayError(f"chunk sizes differ: reference {h}, candidate {candidate.chunk_size}")
    if chunking.mode == "execute" and chunking.execute_steps > h:
        raise ReplayError(f"execute_steps={chunking.execute_steps} exceeds the chunk size {h}")
    dense = every_frame or chunking.mode == "ensemble"
    shape = (h, int(action_dim))
    t_ns, episode, segment, proprio, cmds, plan_of, offset = [], [], [], [], [], [], []
    ref_chunks, cand_chunks = [], []
    instructions: dict[int, str] = {}
    current: tuple[int, str] | None = None
    step, seg_id = 0, -1
    limit = max_frames if max_frames is not None else total
    bar = tqdm(total=limit, desc="drift replay", unit="frame", disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="candidate") if parallel else None
    start = time.perf_counter()
    try:
        for frame in frames:
            if max_frames is not None and len(t_ns) >= max_frames:
                break
            key = (frame.episode, frame.instruction)
            if key != current:  # a new episode or instruction: the robot resets its chunk queue
                episode_seed = int(seed) * 100_003 + frame.episode
                reference.reset(frame.instruction, episode_seed)
                candidate.reset(frame.instruction, episode_seed)
                instructions.setdefault(frame.episode, frame.instruction)
                current, step, seg_id = key, 0, seg_id + 1
            boundary = chunking.mode == "ensemble" or step % chunking.execute_steps == 0
            if dense or boundary:
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
            if boundary:
                last_plan = len(ref_chunks) - 1
            plan_of.append(last_plan)
            offset.append(0 if chunking.mode == "ensemble" else step % chunking.execute_steps)
            segment.append(seg_id)
            t_ns.append(frame.t_ns)
            episode.append(frame.episode)
            proprio.append(frame.proprio)
            cmds.append(frame.command)
            step += 1
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True)
    seconds = time.perf_counter() - start
    if not t_ns:
        raise ReplayError("no frame was replayed")
    ref_arr, cand_arr = np.stack(ref_chunks), np.stack(cand_chunks)
    if chunking.mode == "ensemble":
        seg = np.asarray(segment)
        ref_exec = executed_actions(ref_arr, seg, chunking)
        cand_exec = executed_actions(cand_arr, seg, chunking)
    else:
        plan, off = np.asarray(plan_of), np.asarray(offset)
        ref_exec, cand_exec = ref_arr[plan, off], cand_arr[plan, off]
    shapes = {c.shape for c in cmds if c is not None}
    recorded = None
    if len(shapes) == 1:
        recorded = np.full((len(cmds), next(iter(shapes))[0]), np.nan, dtype=np.float32)
        for i, c in enumerate(cmds):
            if c is not None:
                recorded[i] = c
    ms = 1e3 * seconds / len(t_ns)
    logger.info(
        "replayed %d frames (%d episodes, %d predictions per policy) in %.1f s (%.1f ms/frame)",
        len(t_ns),
        len(instructions),
        len(ref_chunks),
        seconds,
        ms,
    )
    return ReplayResult(
        t_ns=np.asarray(t_ns, dtype=np.int64),
        episode=np.asarray(episode, dtype=np.int64),
        instructions=instructions,
        proprio=np.stack(proprio).astype(np.float32),
        reference_chunks=ref_arr,
        candidate_chunks=cand_arr,
        reference_actions=ref_exec.astype(np.float32),
        candidate_actions=cand_exec.astype(np.float32),
        recorded_commands=recorded,
        seconds=seconds,
        meta={"ms_per_frame": ms, "predictions": float(len(ref_chunks))},
    )
