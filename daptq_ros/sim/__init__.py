"""Meta-World MT10 simulation: environment, instructions, scripted demos, closed-loop evaluation.

Modules (import the one you need; only ``env``, ``expert``, ``demos`` and ``evaluate`` rollouts
need Meta-World/MuJoCo):

- ``tasks``: the 10 MT10 task names, canonical instructions + paraphrases, seed constants.
- ``env``: :class:`MetaWorldEnv` (seeded layouts, fast upright rendering) and ``EnvCache``.
- ``expert``: :class:`ExpertPolicy`, Meta-World's scripted expert as a StepPolicy.
- ``demos`` / ``cli``: ``daptq sim demos`` (parallel, resumable demonstration generation).
- ``dataset_index``: ``list_episodes`` / ``load_episode`` with validation.
- ``evaluate`` / ``evaluate_cli``: ``daptq evaluate`` (success with Wilson CI, kinematic drift).
- ``metrics``: pure-numpy success and drift metrics shared with ``daptq_ros.drift``.
"""

import ctypes.util as _ctypes_util
import os as _os


def _default_mujoco_gl() -> None:
    """Pick a headless MuJoCo GL backend unless the user chose one.

    MuJoCo reads ``MUJOCO_GL`` once, when it is first imported (also indirectly through
    ``metaworld``), so this runs on import of the package, before any sim module imports MuJoCo.
    EGL is preferred (5-13% faster than OSMesa on llvmpipe); OSMesa is the fallback.
    """
    if "MUJOCO_GL" in _os.environ:
        return
    has_egl = _ctypes_util.find_library("EGL") is not None
    has_osmesa = _ctypes_util.find_library("OSMesa") is not None
    _os.environ["MUJOCO_GL"] = "osmesa" if (not has_egl and has_osmesa) else "egl"


_default_mujoco_gl()
