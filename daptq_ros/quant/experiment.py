"""``daptq experiment``: methods x budgets, each quantized and evaluated closed-loop against FP.

For every variant of ``config/experiment.yaml`` (in order, so the list is a priority list):

1. resolve the recipe (base recipe + budget + method + overrides; see :func:`resolve_recipe`),
2. quantize the FP checkpoint, cached under ``OUT/runs/<recipe hash>/`` (hash of the resolved
   recipe, the checkpoint bytes and the demo files), so re-runs resume and identical recipes
   (``rtn`` at W4A8 and at "≤ 4.25 bits" both resolve to uniform W4) are quantized once,
3. evaluate the quantized ``.safetensors`` closed-loop with ``sim.evaluate`` *paired* with the FP
   checkpoint as reference on identical seeds (EE trajectory divergence, open-loop action error,
   paired success counts), cached as ``eval_<eval hash>.json`` next to it,
4. rewrite ``OUT/results.json``, ``OUT/table.md`` and ``OUT/success_vs_bits.png``.

The FP row is the reference side of the paired evaluations (its rollouts do not depend on the
candidate; the runner checks that they agree across variants) or, when no quantized variant was
evaluated, a plain evaluation of the FP checkpoint.

Budgets: for uniform methods (rtn, gptq) a ``budget`` (average bits, scales included) resolves to
the largest uniform bit-width that fits; for allocating methods (daptq, qvla) a uniform budget
``W<b>`` (``budget: null``) becomes the iso-size cap: the average bits of uniform ``b``-bit
weights over the same layers. ``daptq_paper`` has no budget (its k % float rule); its
``low_bits`` is the budget's ``w_bits``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daptq_ros.config_util import ConfigError, load_config, to_dict

logger = logging.getLogger(__name__)

HELP = "methods x budgets x closed-loop evaluation table"
DEFAULT_CONFIG = "config/experiment.yaml"
UNIFORM_METHODS = ("rtn", "gptq")
ALLOCATING_METHODS = ("daptq", "qvla")
INSTRUCTIONS_FILE = "instructions.safetensors"


@dataclass
class BudgetSpec:
    """One budget column. Attributes: label (shown in the table), w_bits (uniform weight bits),
    budget (average-bit cap incl. scales; null = uniform ``w_bits``), a_bits (8 or 16)."""

    label: str = ""
    w_bits: int = 4
    budget: float | None = None
    a_bits: int = 8


@dataclass
class VariantSpec:
    """One row. Attributes: method (a registered method, or ``fp``), budget (a key of
    ``budgets``), name (default ``method@budget``), recipe (extra recipe keys, e.g.
    ``method_options``), ablation (marks ablation rows), note (shown in the table)."""

    method: str = "rtn"
    budget: str = ""
    name: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False
    note: str = ""


@dataclass
class GridSpec:
    """Cross product appended after the explicit variants (duplicates skipped)."""

    methods: list[str] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)


@dataclass
class EvalSpec:
    """Closed-loop evaluation (see ``daptq_ros.sim.evaluate.EvalConfig``)."""

    tasks: list[str] = field(default_factory=lambda: ["all"])
    episodes: int = 10
    seed: int = 100_000
    max_steps: int = 200
    workers: int = 2
    noise_seed: int = 0
    image_size: int = 128


@dataclass
class ExperimentConfig:
    """``config/experiment.yaml``. ``checkpoint`` null = the shipped reference policy;
    ``target_budgets`` names the budgets the issue's targets refer to (roles b425, b325)."""

    version: int = 1
    checkpoint: str | None = None
    demos: str = "/tmp/calib_demos"
    recipe: str = "config/quantize.yaml"
    out: str = "experiment"
    quant_threads: int = 1
    budgets: dict[str, BudgetSpec] = field(default_factory=dict)
    variants: list[VariantSpec] = field(default_factory=list)
    grid: GridSpec = field(default_factory=GridSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    target_budgets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ConfigError(f"version: {self.version} is not supported (expected 1)")
        for i, v in enumerate(self.all_variants()):
            if v.method != "fp" and v.budget not in self.budgets:
                raise ConfigError(f"variants[{i}].budget: {v.budget!r} is not a key of budgets")
        names = [v.name for v in self.all_variants()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"variants: duplicate names {dup}")

    def all_variants(self) -> list[VariantSpec]:
        """Explicit variants, then the grid (skipping method@budget pairs already listed)."""
        out = []
        for v in self.variants:
            out.append(v if v.name else VariantSpec(**{**to_dict(v), "name": _default_name(v)}))
        have = {(v.method, v.budget) for v in out if not v.ablation} | {v.name for v in out}
        for b in self.grid.budgets:
            for m in self.grid.methods:
                if (m, b) not in have and f"{m}@{b}" not in have:
                    out.append(VariantSpec(method=m, budget=b, name=f"{m}@{b}"))
                    have.add((m, b))
        return out


def _default_name(v: VariantSpec) -> str:
    return "fp" if v.method == "fp" else f"{v.method}@{v.budget}"


# ------------------------------------------------------------------------------- recipes
def _shapes(model, adapter, skip: list[str]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    from daptq_ros.quant.budget import layer_shape
    from daptq_ros.quant.engine import get_module, match_any

    names = adapter.quantizable_layers(model)
    shapes = {n: layer_shape(get_module(model, n)) for n in names}
    return shapes, [n for n in names if not match_any(n, skip)]


def uniform_avg_bits(model, adapter, recipe, bits: int) -> float:
    """Average bits of uniform ``bits`` weights on the recipe's target layers (skips at 16)."""
    from torch import nn

    from daptq_ros.quant.budget import avg_bits
    from daptq_ros.quant.engine import get_module
    from daptq_ros.quant.fakequant import LayerSpec

    shapes, targets = _shapes(model, adapter, recipe.skip)
    plan = {}
    for n in targets:
        conv = isinstance(get_module(model, n), nn.Conv2d)
        plan[n] = LayerSpec(
            w_bits=bits, group_size=0 if conv else recipe.group_size, symmetric=recipe.symmetric
        )
    return avg_bits(plan, shapes)


def resolve_recipe(base: dict[str, Any], budget: BudgetSpec, variant: VariantSpec, model, adapter):
    """The exact QuantRecipe of a variant (budget semantics in the module docstring)."""
    from daptq_ros.quant.budget import BudgetError
    from daptq_ros.quant.fakequant import INT_WEIGHT_BITS
    from daptq_ros.quant.recipe import load_recipe

    data = {**base, "method": variant.method, "a_bits": budget.a_bits, "w_bits": budget.w_bits}
    data["budget"] = budget.budget
    options = copy.deepcopy(base.get("method_options") or {})
    for key, value in variant.recipe.items():
        if key == "method_options":
            for m, opts in value.items():
                options[m] = {**(options.get(m) or {}), **opts}
        else:
            data[key] = value
    data["method_options"] = options
    recipe = load_recipe(data)
    if variant.method in UNIFORM_METHODS and recipe.budget is not None:
        fits = [
            b for b in INT_WEIGHT_BITS if uniform_avg_bits(model, adapter, recipe, b) <= recipe.budget + 1e-9
        ]
        if not fits:
            raise BudgetError(f"budget {recipe.budget} fits no uniform bit-width")
        data.update(w_bits=max(fits), budget=None)
    elif variant.method in ALLOCATING_METHODS and recipe.budget is None:
        data["budget"] = round(uniform_avg_bits(model, adapter, recipe, recipe.w_bits), 6)
    elif variant.method == "daptq_paper":
        data["budget"] = None
        paper = {**(options.get("daptq_paper") or {})}
        paper.setdefault("low_bits", recipe.w_bits)
        options["daptq_paper"] = paper
        data["method_options"] = options
    # Only the selected method's options matter: drop the others so the hash ignores them.
    data["method_options"] = {variant.method: data["method_options"].get(variant.method) or {}}
    return load_recipe(data)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def demos_fingerprint(demo_dir: str | Path) -> str:
    """Hash of the demo file names and sizes (cheap; demos are written once)."""
    from daptq_ros.model.data import list_demo_files

    root = Path(demo_dir)
    items = [(str(p.relative_to(root)), p.stat().st_size) for p in list_demo_files(root)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


# ------------------------------------------------------------------------------- runner
class Runner:
    """Quantize/evaluate variants with caching; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, out: Path, force: bool = False) -> None:
        from daptq_ros.quant.cli import DEFAULT_CHECKPOINT

        self.cfg = cfg
        self.out = out
        self.force = force
        self.checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else DEFAULT_CHECKPOINT
        if not self.checkpoint.is_file():
            raise ConfigError(f"checkpoint: {self.checkpoint} not found")
        self._loaded = None
        self._batches = None
        self._base = None
        self.ckpt_digest = file_digest(self.checkpoint)

    # lazily loaded pieces -------------------------------------------------------------------
    @property
    def loaded(self):
        if self._loaded is None:
            from daptq_ros.model.io import load_checkpoint

            self._loaded = load_checkpoint(self.checkpoint)
        return self._loaded

    @property
    def adapter(self):
        from daptq_ros.model.adapter import ReferenceVLAAdapter

        return ReferenceVLAAdapter()

    @property
    def base_recipe(self) -> dict[str, Any]:
        if self._base is None:
            import yaml

            path = Path(self.cfg.recipe)
            if not path.is_file():
                raise ConfigError(f"recipe: {path} not found")
            self._base = yaml.safe_load(path.read_text()) or {}
        return self._base

    def batches(self, recipe):
        """Calibration batches (cached per frame count and seed: identical for every variant)."""
        key = (recipe.calib_frames, recipe.seed)
        if self._batches is None or self._batches[0] != key:
            from daptq_ros.model.data import calibration_batches

            batches = calibration_batches(
                self.cfg.demos, self.loaded, n_frames=recipe.calib_frames, seed=recipe.seed, with_actions=True
            )
            self._batches = (key, batches)
        return self._batches[1]

    def eval_config(self):
        from daptq_ros.sim.evaluate import EvalConfig

        e = self.cfg.eval
        tasks = e.tasks[0] if e.tasks == ["all"] else e.tasks
        from daptq_ros.sim.tasks import parse_tasks

        return EvalConfig(
            tasks=tuple(parse_tasks(tasks)),
            episodes=e.episodes,
            seed=e.seed,
            max_steps=e.max_steps,
            workers=e.workers,
            noise_seed=e.noise_seed,
            image_size=e.image_size,
        )

    def eval_key(self) -> str:
        from dataclasses import asdict

        from daptq_ros.quant.experiment_report import recipe_hash

        cfg = asdict(self.eval_config())
        cfg.pop("workers")
        cfg.pop("policy_threads")
        return recipe_hash({"eval": cfg, "reference": self.ckpt_digest})

    # one variant ----------------------------------------------------------------------------
    def run_dir(self, recipe) -> Path:
        from daptq_ros.quant.experiment_report import recipe_hash

        key = recipe_hash(
            {
                "recipe": to_dict(recipe),
                "checkpoint": self.ckpt_digest,
                "demos": demos_fingerprint(self.cfg.demos),
            }
        )
        return self.out / "runs" / key

    def has_quantized(self, run_dir: Path) -> bool:
        return (run_dir / "quant.json").is_file() and (run_dir / "quantized.safetensors").is_file()

    def quantize(self, recipe, run_dir: Path) -> dict[str, Any]:
        """Quantize (or load the cached summary); returns the quantization summary."""
        summary_path = run_dir / "quant.json"
        ckpt = run_dir / "quantized.safetensors"
        if self.has_quantized(run_dir) and not self.force:
            return json.loads(summary_path.read_text())
        import torch

        from daptq_ros.quant.api import quantize_policy
        from daptq_ros.quant.checkpoint import save_quantized

        threads = torch.get_num_threads()
        torch.set_num_threads(self.cfg.quant_threads)
        try:
            model = copy.deepcopy(self.loaded.model)
            t0, c0 = time.perf_counter(), time.process_time()
            result = quantize_policy(model, self.adapter, self.batches(recipe), recipe)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            torch.set_num_threads(threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        provenance = {
            "command": "daptq experiment",
            "checkpoint": str(self.checkpoint),
            "demos": self.cfg.demos,
        }
        save_quantized(ckpt, model, result, self.loaded.meta, provenance)
        src = self.checkpoint.parent / INSTRUCTIONS_FILE
        if src.is_file():
            shutil.copyfile(src, run_dir / INSTRUCTIONS_FILE)
        extras = result.extras
        summary = {
            "method": result.method,
            "recipe": result.recipe,
            "avg_bits": result.avg_bits,
            "budget": result.budget,
            "drift_loss": result.drift_loss,
            "size": result.size,
            "wall_s": wall,
            "cpu_s": cpu,
            "calib_frames": result.calib_frames,
            "details": {
                "map": extras.get("map"),
                "guard": extras.get("guard"),
                "uniform_bits": extras.get("uniform_bits"),
                "csrc_kept": sorted(n for n, v in (extras.get("csrc") or {}).items() if v.get("kept", True)),
                "float_layers": len([s for s in result.layers.values() if s.is_float]),
                "pruned_channels": extras.get("pruned_channels"),
                "bias_correction": extras.get("bias_correction"),
            },
        }
        (run_dir / "quant.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary

    def evaluate(self, policy: Path | None, cache_path: Path) -> dict[str, Any]:
        """Paired closed-loop evaluation of ``policy`` vs FP (plain FP evaluation when None)."""
        if cache_path.is_file() and not self.force:
            return json.loads(cache_path.read_text())
        from daptq_ros.sim.evaluate import evaluate

        if policy is None:
            result = evaluate(str(self.checkpoint), config=self.eval_config())
        else:
            result = evaluate(str(policy), reference=str(self.checkpoint), config=self.eval_config())
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(result, default=str))
        return result


def summarize_eval(result: dict[str, Any], side: str = "candidate") -> dict[str, Any]:
    """Compact eval entry of a row from an ``evaluate`` result (``side="reference"``: FP's side)."""
    from daptq_ros.sim import metrics

    eps = result["episodes"]
    key = "success" if side == "candidate" else "reference_success"
    succ = [bool(e[key]) for e in eps]
    out: dict[str, Any] = dict(metrics.success_summary(succ))
    per_task: dict[str, dict[str, int]] = {}
    for e, s in zip(eps, succ, strict=True):
        t = per_task.setdefault(e["task"], {"successes": 0, "episodes": 0})
        t["episodes"] += 1
        t["successes"] += int(s)
    out["per_task"] = per_task
    out["outcomes"] = [[e["task"], e["seed"], s] for e, s in zip(eps, succ, strict=True)]
    ov = result["overall"]
    if side == "candidate" and "paired" in ov:
        ol = ov["drift"]["open_loop"]["mean_per_dof"]
        out.update(
            paired=ov["paired"],
            ee_mean=ov["drift"]["ee_mean_distance"],
            ee_final=ov["drift"]["ee_final_distance"],
            open_loop=float(sum(ol) / len(ol)) if ol else None,
            open_loop_per_dof=ol,
        )
    out["wall_s"] = result["timing"]["wall_s"]
    return out


def _notes(variant: VariantSpec, q: dict[str, Any]) -> str:
    d = q.get("details") or {}
    parts = [variant.note] if variant.note else []
    if d.get("map"):
        parts.append(f"map: {d['map']}")
    if d.get("uniform_bits") and q.get("method") in ("rtn", "gptq", "smoothquant", "quantvla"):
        parts.append(f"W{d['uniform_bits']}")
    if q.get("method") in ("daptq", "daptq_paper") and d.get("csrc_kept") is not None:
        kept = [n.rsplit(".", 1)[-1] for n in d["csrc_kept"]]
        parts.append("CSRC " + ("+".join(kept) if kept else "none kept"))
    bias = d.get("bias_correction")
    if isinstance(bias, dict) and bias.get("applied"):
        parts.append("bias corr. " + ("kept" if bias.get("kept") else "reverted"))
    if d.get("pruned_channels"):
        parts.append(f"{d['pruned_channels']} pruned ch")
    if d.get("float_layers"):
        parts.append(f"{d['float_layers']} float layers")
    return "; ".join(p for p in parts if p)


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    only: list[str] | None = None,
    force: bool = False,
    quantize_only: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the experiment; returns the results object also written to ``OUT``."""
    from daptq_ros.quant.experiment_report import (
        correlations,
        format_checks,
        format_correlations,
        format_table,
        format_task_table,
        plot_success_vs_bits,
        target_checks,
    )

    runner = Runner(cfg, out, force)
    variants = cfg.all_variants()
    selected = {v.name for v in variants}
    if only:
        unknown = sorted(set(only) - selected)
        if unknown:
            raise ConfigError(f"--only: unknown variants {unknown}; have {[v.name for v in variants]}")
        selected = set(only)
    rows: list[dict[str, Any]] = []
    fp_variant = next((v for v in variants if v.method == "fp"), VariantSpec(method="fp", name="fp"))
    fp: dict[str, Any] = {
        "name": fp_variant.name,
        "method": "fp",
        "budget": "FP32",
        "avg_bits": 16.0,
        "size_ratio_fp16": 1.0,
        "drift_loss": 0.0,
        "status": "pending",
        "notes": fp_variant.note,
    }
    rows.append(fp)
    eval_key = runner.eval_key()
    reference_outcomes: list[Any] = []
    started = time.perf_counter()

    def write() -> dict[str, Any]:
        if fp.get("eval") is None and reference_outcomes:
            fp["eval"], fp["status"] = reference_outcomes[0][1], "done"
        consistent = all(r[1]["outcomes"] == reference_outcomes[0][1]["outcomes"] for r in reference_outcomes)
        shown = [r for r in rows if r.get("status") != "pending"]
        checks = target_checks(shown, cfg.target_budgets)
        evaluated = [r for r in rows if r.get("eval") and r.get("method") != "fp"]
        compute = {
            "quant_wall_s": sum(r.get("quant_wall_s") or 0.0 for r in rows),
            "quant_cpu_s": sum(r.get("quant_cpu_s") or 0.0 for r in rows),
            "eval_wall_s": sum(r["eval"].get("wall_s") or 0.0 for r in evaluated),
            "paired_episodes": sum(r["eval"]["episodes"] for r in evaluated),
        }
        results = {
            "format": "daptq-experiment",
            "version": 1,
            "config": to_dict(cfg),
            "checkpoint": str(runner.checkpoint),
            "eval_key": eval_key,
            "rows": rows,
            "correlations": correlations(shown),
            "targets": checks,
            "reference_consistent": consistent,
            "compute": compute,
            "wall_s": time.perf_counter() - started,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        pending = [r["name"] for r in rows if r.get("status") == "pending"]
        text = [
            format_table(shown),
            "",
            format_correlations(results["correlations"]),
            "",
            format_checks(checks),
            "",
            format_task_table(shown),
            "",
            f"Compute: quantization {compute['quant_wall_s'] / 60:.1f} min wall "
            f"({compute['quant_cpu_s'] / 60:.1f} min CPU), closed-loop evaluation "
            f"{compute['eval_wall_s'] / 60:.1f} min wall for {compute['paired_episodes']} paired episodes.",
        ]
        if pending:
            text += ["", f"Not run yet ({len(pending)}): {', '.join(pending)}."]
        if not consistent:
            text += ["", "WARNING: the FP reference rollouts differed between paired evaluations."]
        (out / "table.md").write_text("\n".join(text) + "\n")
        if any(r.get("eval") for r in rows):
            plot_success_vs_bits(shown, out / "success_vs_bits.png")
        return results

    for v in variants:
        if v.method == "fp":
            continue
        budget = cfg.budgets[v.budget]
        row: dict[str, Any] = {
            "name": v.name,
            "method": v.method,
            "budget": budget.label or v.budget,
            "ablation": v.ablation,
            "status": "pending",
            "notes": v.note,
        }
        rows.append(row)
        compute = v.name in selected
        try:
            recipe = resolve_recipe(runner.base_recipe, budget, v, runner.loaded.model, runner.adapter)
            run_dir = runner.run_dir(recipe)
            row["run"] = run_dir.name
            if compute:
                logger.info("[%s] quantizing (run %s)", v.name, run_dir.name)
                q = runner.quantize(recipe, run_dir)
            elif runner.has_quantized(run_dir):  # not selected: show what is cached, compute nothing
                q = json.loads((run_dir / "quant.json").read_text())
            else:
                continue
        except (ConfigError, ValueError) as err:  # BudgetError, CalibrationError, ... are ValueErrors
            if compute:
                logger.error("[%s] quantization failed: %s", v.name, err)
                row["status"] = f"failed: {err}"
                write()
            continue
        first = next((r for r in rows[:-1] if r.get("run") == run_dir.name), None)
        row.update(
            avg_bits=q["avg_bits"],
            drift_loss=q["drift_loss"],
            size_ratio_fp16=q["size"]["quant_bytes"] / q["size"]["fp16_bytes"],
            quant_wall_s=q["wall_s"],
            quant_cpu_s=q["cpu_s"],
            notes=_notes(v, q) + (f"; same recipe as {first['name']}" if first else ""),
            details=q["details"],
            status="quantized",
        )
        eval_path = run_dir / f"eval_{eval_key}.json"
        if quantize_only or not (compute or eval_path.is_file()):
            write()
            continue
        if compute:
            logger.info("[%s] evaluating", v.name)
            result = runner.evaluate(run_dir / "quantized.safetensors", eval_path)
        else:
            result = json.loads(eval_path.read_text())
        row["eval"] = summarize_eval(result)
        row["status"] = "done"
        reference_outcomes.append((v.name, summarize_eval(result, side="reference")))
        write()
        logger.info("[%s] success %.1f%%", v.name, 100 * row["eval"]["success_rate"])
    if fp.get("eval") is None and not reference_outcomes and not quantize_only:
        result = runner.evaluate(None, out / "runs" / "fp" / f"eval_{eval_key}.json")
        fp["eval"], fp["status"] = summarize_eval(result), "done"
    return write()


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default: %(default)s)")
    parser.add_argument("--out", help="output directory (overrides the config's out)")
    parser.add_argument("--only", help="comma-separated variant names to run (FP always included)")
    parser.add_argument("--episodes", type=int, help="override eval.episodes")
    parser.add_argument("--tasks", help="override eval.tasks (comma-separated or 'all')")
    parser.add_argument("--workers", type=int, help="override eval.workers")
    parser.add_argument("--max-steps", type=int, help="override eval.max_steps")
    parser.add_argument("--demos", help="override demos")
    parser.add_argument("--checkpoint", help="override checkpoint")
    parser.add_argument("--quantize-only", action="store_true", help="quantize every variant, evaluate none")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--force", action="store_true", help="ignore cached checkpoints and evaluations")
    parser.add_argument("--json", help="also write the results JSON here")


def load_experiment(path: str | Path, args: argparse.Namespace | None = None) -> ExperimentConfig:
    """Load the YAML and apply CLI overrides (errors name the key)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    if args is not None:
        ev = dict(data.get("eval") or {})
        for key, attr in (("episodes", "episodes"), ("workers", "workers"), ("max_steps", "max_steps")):
            if getattr(args, attr, None) is not None:
                ev[key] = getattr(args, attr)
        if getattr(args, "tasks", None):
            ev["tasks"] = ["all"] if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
        data["eval"] = ev
        for key in ("demos", "checkpoint", "out"):
            if getattr(args, key, None):
                data[key] = getattr(args, key)
    return load_config(ExperimentConfig, data)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_experiment(args.config, args)
        if args.list:
            for v in cfg.all_variants():
                print(f"{v.name:32s} {v.method:12s} {v.budget:14s} {'ablation' if v.ablation else ''}")
            return 0
        only = [s.strip() for s in args.only.split(",")] if args.only else None
        results = run_experiment(
            cfg, Path(cfg.out), only=only, force=args.force, quantize_only=args.quantize_only
        )
    except (ConfigError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    print((Path(cfg.out) / "table.md").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0
