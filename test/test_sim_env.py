"""MetaWorldEnv: observation shapes/dtypes, upright images, seeded layouts, errors; the expert."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mujoco
import numpy as np
import pytest

from daptq_ros.policy_api import Observation, StepPolicy
from daptq_ros.sim.env import MetaWorldEnv
from daptq_ros.sim.expert import ExpertPolicy
from daptq_ros.sim.tasks import canonical_instruction

pytestmark = pytest.mark.sim
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def push_env():
    with MetaWorldEnv("push-v3", image_size=64, wrist_camera="gripperPOV") as env:
        yield env


def test_observation_shapes_and_dtypes(push_env):
    obs = push_env.reset(3)
    assert isinstance(obs, Observation)
    assert obs.image.shape == (64, 64, 3) and obs.image.dtype == np.uint8
    assert obs.wrist_image.shape == (64, 64, 3) and obs.wrist_image.dtype == np.uint8
    assert obs.proprio.shape == (4,) and obs.proprio.dtype == np.float32
    assert obs.state.shape == (39,) and obs.state.dtype == np.float32
    np.testing.assert_allclose(obs.proprio, obs.state[:4])
    np.testing.assert_allclose(push_env.hand_position, obs.state[:3], atol=1e-6)
    assert np.any(obs.state[36:] != 0), "goal must be observable (experts read it)"
    obs2, success, info = push_env.step(np.array([1.0, 0.0, 0.0, 0.0]))
    assert isinstance(success, bool) and "success" in info
    assert obs2.state[0] > obs.state[0], "dx=+1 must move the hand along +x"
    # out-of-range actions are clipped, not rejected
    _, _, info = push_env.step(np.array([5.0, -5.0, 0.0, 2.0]))
    np.testing.assert_array_equal(info["action"], [1.0, -1.0, 0.0, 1.0])


def test_main_camera_is_rotated_raw_render(push_env):
    """The corner camera is mounted upside-down: the observation is the raw render rotated 180°."""
    obs = push_env.reset(4)
    raw_renderer = mujoco.Renderer(push_env._env.model, 64, 64)
    try:
        raw_renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        raw_renderer.update_scene(push_env._env.data, camera="corner4")
        raw = raw_renderer.render()
    finally:
        raw_renderer.close()
    np.testing.assert_array_equal(obs.image, raw[::-1, ::-1])
    assert not np.array_equal(obs.image, raw)
    assert not np.array_equal(obs.image, raw[::-1]), "a vertical flip alone would mirror the scene"


def test_reset_is_a_function_of_the_seed(push_env):
    first = push_env.reset(11)
    for _ in range(5):
        push_env.step(np.array([0.3, -0.2, 0.1, 1.0]))
    other = push_env.reset(12)
    again = push_env.reset(11)
    np.testing.assert_array_equal(first.state, again.state)
    np.testing.assert_array_equal(first.image, again.image)
    assert not np.allclose(first.state[4:7], other.state[4:7]), "different seeds, different puck"


def test_layout_is_identical_in_a_fresh_process(push_env):
    # Also checks the headless GL default: no MUJOCO_GL set, and Meta-World (thus MuJoCo) is
    # imported through the expert before the env module.
    code = (
        "import json; from daptq_ros.sim.expert import ExpertPolicy\n"
        "from daptq_ros.sim.env import MetaWorldEnv\n"
        "with MetaWorldEnv('push-v3', image_size=64) as env:\n"
        "    print(json.dumps(env.reset(11).state.tolist()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120, check=True)
    other = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_array_equal(other, push_env.reset(11).state)


def test_bad_inputs_raise_clear_errors(push_env):
    with pytest.raises(ValueError, match=r"unknown task 'push-v2'.*reach-v3"):
        MetaWorldEnv("push-v2")
    with pytest.raises(ValueError, match=r"unknown camera 'nadir'.*corner4"):
        MetaWorldEnv("reach-v3", camera="nadir")
    with pytest.raises(ValueError, match="seed"):
        push_env.reset(-1)
    push_env.reset(0)
    with pytest.raises(ValueError, match="4 values"):
        push_env.step(np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        push_env.step(np.array([np.nan, 0, 0, 0]))


def test_step_before_reset_and_after_close():
    env = MetaWorldEnv("reach-v3", image_size=32)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(4))
    env.close()
    env.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(0)


def test_expert_is_a_step_policy_and_solves_reach():
    expert = ExpertPolicy()
    assert isinstance(expert, StepPolicy) and expert.chunk_size == 1
    with MetaWorldEnv("reach-v3", image_size=32) as env:
        obs = env.reset(0)
        expert.reset(canonical_instruction("reach-v3"), 0)
        assert expert.task == "reach-v3"
        chunk = expert.predict_chunk(obs, np.zeros((1, 4), dtype=np.float32))
        assert chunk.shape == (1, 4) and chunk.dtype == np.float32
        success = False
        for _ in range(120):
            obs, success, _ = env.step(expert.act(obs))
            if success:
                break
        assert success


def test_expert_errors():
    obs = Observation(image=np.zeros((8, 8, 3), np.uint8), proprio=np.zeros(4, np.float32))
    with pytest.raises(RuntimeError, match="before reset"):
        ExpertPolicy().act(obs)
    with pytest.raises(ValueError, match="unknown task"):
        ExpertPolicy("push-v9")
    expert = ExpertPolicy("push-v3")
    with pytest.raises(ValueError, match="belongs to reach-v3"):
        expert.reset(canonical_instruction("reach-v3"), 0)
    expert.reset(canonical_instruction("push-v3"), 0)
    with pytest.raises(ValueError, match=r"Observation\.state"):
        expert.act(obs)


def test_importing_triton_after_rendering_does_not_crash():
    """Regression: triton's LLVM clashes with Mesa llvmpipe once a GL context exists (SIGSEGV)."""
    pytest.importorskip("triton")
    code = (
        "from daptq_ros.sim.env import MetaWorldEnv\n"
        "with MetaWorldEnv('reach-v3', image_size=32) as env:\n"
        "    env.reset(0)\n"
        "    import triton  # noqa\n"
        "    env.step([0, 0, 0, 0])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
