"""The Meta-World MT10 (v3) tasks and their language instructions.

Meta-World ships no language strings, so each task has one canonical instruction (used for
demonstrations and evaluation) plus three paraphrases (for instruction augmentation and
robustness checks). Every string maps back to exactly one task.
"""

from __future__ import annotations

from collections.abc import Iterable

EVAL_SEED_START = 100_000
"""First evaluation layout seed; demonstrations use seeds below it (see daptq_ros.sim.env)."""
DEMO_SEED_START = 0
"""Default first demonstration layout seed."""

# Order matters: it is the order of reports and of `--tasks all`.
MT10_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

# task -> (canonical instruction, paraphrase 1, paraphrase 2, paraphrase 3).
# The canonical strings are the INSTR table of the shared simulation notes; keep them stable, since
# instruction feature caches and trained checkpoints are keyed by the exact text.
_INSTRUCTIONS: dict[str, tuple[str, str, str, str]] = {
    "reach-v3": (
        "reach the red goal position",
        "move the gripper to the red goal",
        "reach toward the red target",
        "put the hand at the red goal point",
    ),
    "push-v3": (
        "push the puck to the goal",
        "slide the puck over to the goal",
        "push the puck onto the goal position",
        "nudge the puck until it reaches the goal",
    ),
    "pick-place-v3": (
        "pick up the puck and place it at the goal",
        "grasp the puck and put it on the goal",
        "lift the puck and move it to the goal",
        "pick the puck up and set it down at the goal",
    ),
    "door-open-v3": (
        "open the door",
        "swing the door open",
        "pull the door open",
        "open the door all the way",
    ),
    "drawer-open-v3": (
        "open the drawer",
        "pull the drawer open",
        "slide the drawer out",
        "pull out the drawer",
    ),
    "drawer-close-v3": (
        "close the drawer",
        "push the drawer closed",
        "slide the drawer shut",
        "push the drawer in",
    ),
    "button-press-topdown-v3": (
        "press the button from the top",
        "push the button down from above",
        "press down on the button",
        "push the button from the top",
    ),
    "peg-insert-side-v3": (
        "insert the peg into the hole from the side",
        "push the peg sideways into the hole",
        "put the peg into the side hole",
        "slide the peg into the hole",
    ),
    "window-open-v3": (
        "slide the window open",
        "open the window",
        "push the window open",
        "slide the window to open it",
    ),
    "window-close-v3": (
        "slide the window closed",
        "close the window",
        "push the window shut",
        "slide the window to close it",
    ),
}


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


_TASK_BY_TEXT: dict[str, str] = {
    _normalize(text): task for task, texts in _INSTRUCTIONS.items() for text in texts
}
if len(_TASK_BY_TEXT) != sum(len(v) for v in _INSTRUCTIONS.values()):  # pragma: no cover
    raise RuntimeError("instruction table has a string shared by two tasks")


def check_task(task: str) -> str:
    """Return ``task`` if it is an MT10 task name, else raise ValueError listing the valid ones."""
    if task not in _INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; valid MT10 tasks: {', '.join(MT10_TASKS)}")
    return task


def parse_tasks(spec: str | Iterable[str]) -> list[str]:
    """Parse a task selection: ``"all"``, ``"t1,t2"`` or an iterable of names (order kept).

    Raises:
        ValueError: an unknown task name, or an empty selection.
    """
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(MT10_TASKS)
        names = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        names = [str(name) for name in spec]
    if not names:
        raise ValueError(f"empty task selection {spec!r}; use 'all' or a comma-separated list")
    out: list[str] = []
    for name in names:
        check_task(name)
        if name not in out:
            out.append(name)
    return out


def canonical_instruction(task: str) -> str:
    """The instruction used for demonstrations and evaluation of ``task``."""
    return _INSTRUCTIONS[check_task(task)][0]


def instructions_for(task: str) -> list[str]:
    """All instructions of ``task``: the canonical one first, then the three paraphrases."""
    return list(_INSTRUCTIONS[check_task(task)])


def all_instructions() -> list[str]:
    """Every instruction of every MT10 task (task order, canonical first within a task)."""
    return [text for task in MT10_TASKS for text in _INSTRUCTIONS[task]]


def task_for_instruction(text: str) -> str:
    """The task an instruction belongs to (case and whitespace are ignored).

    Raises:
        ValueError: ``text`` is none of the known instructions.
    """
    task = _TASK_BY_TEXT.get(_normalize(text))
    if task is None:
        raise ValueError(
            f"unknown instruction {text!r}; known canonical instructions: "
            + "; ".join(repr(canonical_instruction(t)) for t in MT10_TASKS)
        )
    return task
