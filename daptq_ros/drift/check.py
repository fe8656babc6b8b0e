"""`check_drift`: bag → open-loop replay through two policies → report directory and verdict.

The report is written into a hidden temporary sibling directory and renamed into place only
when complete, so a failed run (bad bag, bad artifact) never leaves a report that looks valid.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daptq_ros.drift.bag_io import BagFrames, bag_topics_summary
from daptq_ros.drift.config import DriftConfig
from daptq_ros.drift.replay import ReplayError, replay
from daptq_ros.drift.report import build_summary, write_report
from daptq_ros.policy_api import ACTION_NAMES, StepPolicy

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md")


class PolicyLoadError(ValueError):
    """A reference/candidate path is not a loadable policy."""


@dataclass
class LoadedPolicy:
    """A StepPolicy with what the drift tools need to know about it."""

    policy: StepPolicy
    action_names: list[str]
    info: dict[str, Any]


def load_policy(path: str | Path, threads: int | None = 1) -> LoadedPolicy:
    """Load an artifact directory (ONNX Runtime) or a ``.safetensors`` checkpoint (torch).

    Raises:
        PolicyLoadError: the path does not exist or is neither kind; load errors are wrapped.
    """
    path = Path(path)
    if path.is_dir():
        from daptq_ros.runtime.onnx_policy import OnnxStepPolicy

        if not (path / "manifest.json").is_file():
            raise PolicyLoadError(f"{path} is a directory without manifest.json; not a policy artifact")
        try:
            policy = OnnxStepPolicy(path, threads=threads)
        except Exception as err:
            raise PolicyLoadError(f"cannot load artifact {path}: {type(err).__name__}: {err}") from err
        m = policy.manifest
        info = {
            "path": str(path),
            "method": m.method,
            "avg_bits": m.avg_bits,
            "flavour": m.flavour,
            "provider": policy.provider,
            "model_sha256": m.model_sha256,
        }
        return LoadedPolicy(policy, list(m.action_names), info)
    if path.is_file() and path.suffix == ".safetensors":
        try:
            from daptq_ros.sim.evaluate import load_policy as load_torch_policy

            policy = load_torch_policy(str(path))
        except Exception as err:
            raise PolicyLoadError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
        names = list(getattr(policy, "action_names", ACTION_NAMES))
        return LoadedPolicy(policy, names, {"path": str(path), "method": getattr(policy, "method", "torch")})
    raise PolicyLoadError(f"{path} does not exist or is not an artifact directory / .safetensors checkpoint")


def _prepare_output(report_dir: Path) -> None:
    """Refuse to replace a non-empty directory that is not a previous drift report."""
    if report_dir.exists():
        if not report_dir.is_dir():
            raise FileExistsError(f"report path {report_dir} exists and is not a directory")
        entries = list(report_dir.iterdir())
        if entries and not (report_dir / "report.json").is_file():
            raise FileExistsError(
                f"report directory {report_dir} is not empty and holds no previous report; "
                "refusing to overwrite it"
            )


def check_drift(
    bag: str | Path,
    reference: str | Path | LoadedPolicy,
    candidate: str | Path | LoadedPolicy,
    report_dir: str | Path,
    config: DriftConfig | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Replay ``bag`` through both policies and write the drift report; returns report.json's object.

    Raises:
        BagError: the bag is unusable. PolicyLoadError / ReplayError: the policies are.
        FileExistsError: ``report_dir`` holds something other than a previous report.
    """
    config = config or DriftConfig()
    report_dir = Path(report_dir)
    _prepare_output(report_dir)
    frames = BagFrames(bag, config.topics)
    ref = reference if isinstance(reference, LoadedPolicy) else load_policy(reference, threads)
    cand = candidate if isinstance(candidate, LoadedPolicy) else load_policy(candidate, threads)
    if ref.action_names != cand.action_names:
        raise ReplayError(f"action names differ: reference {ref.action_names}, candidate {cand.action_names}")
    for name, loaded in (("reference", ref), ("candidate", cand)):
        for instruction in frames.instructions:
            problem = _instruction_problem(loaded.policy, instruction)
            if problem:
                raise ReplayError(
                    f"the bag's instruction {instruction!r} is unusable with the {name} "
                    f"{loaded.info.get('path')}: {problem}"
                )
    result = replay(
        frames,
        ref.policy,
        cand.policy,
        len(ref.action_names),
        config.replay.chunking,
        seed=config.replay.seed,
        max_frames=config.replay.max_frames,
        every_frame=config.replay.every_frame,
        total=frames.n_images,
        progress=progress,
    )
    inputs = {
        "bag": str(bag),
        "reference": ref.info.get("path"),
        "candidate": cand.info.get("path"),
        "reference_method": ref.info.get("method"),
        "candidate_method": cand.info.get("method"),
        "candidate_avg_bits": cand.info.get("avg_bits"),
        "reference_info": ref.info,
        "candidate_info": cand.info,
        "bag_topics": bag_topics_summary(bag),
        "skipped_images": frames.skipped,
    }
    summary = build_summary(result, ref.action_names, config, inputs)
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.partial-", dir=report_dir.parent))
    try:
        write_report(summary, result, config, tmp)
        if report_dir.exists():
            shutil.rmtree(report_dir)
        tmp.rename(report_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "drift report %s: %s",
        report_dir,
        "PASS" if summary["passed"] else "FAIL (" + ", ".join(summary["failed_checks"]) + ")",
    )
    return summary


def _instruction_problem(policy: Any, instruction: str) -> str | None:
    """Why the policy's instruction table refuses ``instruction`` (None = usable or no table)."""
    table = getattr(policy, "instructions", None)
    if table is None or not hasattr(table, "lookup"):
        return None
    try:
        table.lookup(instruction, allow_encode=getattr(policy, "allow_encode", False))
    except (KeyError, ValueError) as err:
        return str(err).splitlines()[0]
    return None
