"""`colcon build` of the package (ament_python) into a temp dir: console scripts in
lib/daptq_ros, launch/config/package.xml in share, and ament_index finds the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_ros_support import REPO

COLCON = Path(sys.executable).parent / "colcon"
PACKAGE_FILES = ("package.xml", "setup.py", "setup.cfg", "resource", "daptq_ros", "launch", "config")
SCRIPTS = ("quantize", "policy_node", "sim_bridge", "drift_check", "daptq")
SHARE = ("launch/policy.launch.py", "config/policy.yaml", "package.xml")


@pytest.fixture(scope="module")
def install_dir(tmp_path_factory):
    if not COLCON.exists():
        pytest.fail(f"colcon not found at {COLCON}; install colcon-common-extensions in the venv")
    root = tmp_path_factory.mktemp("colcon")
    src = root / "src" / "daptq_ros"
    src.mkdir(parents=True)
    for name in PACKAGE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    env = dict(os.environ, PATH=f"{COLCON.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [str(COLCON), "--log-base", str(root / "log"), "build", "--base-paths", str(root / "src"),
         "--build-base", str(root / "build"), "--install-base", str(root / "install"),
         "--event-handlers", "console_direct-"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "daptq_ros" in proc.stdout + proc.stderr
    return root / "install"


def test_console_scripts_installed(install_dir):
    lib = install_dir / "daptq_ros" / "lib" / "daptq_ros"
    for script in SCRIPTS:
        assert (lib / script).is_file(), f"missing {lib / script}"
        assert os.access(lib / script, os.X_OK)


def test_share_files_installed(install_dir):
    share = install_dir / "daptq_ros" / "share" / "daptq_ros"
    for rel in SHARE:
        assert (share / rel).is_file(), f"missing {share / rel}"
    assert (share / "config" / "policy.yaml").read_text() == (REPO / "config" / "policy.yaml").read_text()


def test_built_as_ament_python(install_dir):
    # an invalid package.xml silently yields a plain (python) package without the ament marker
    marker = install_dir / "daptq_ros" / "share" / "ament_index" / "resource_index" / "packages" / "daptq_ros"
    assert marker.is_file()


def test_ament_index_finds_package(install_dir):
    code = ("from ament_index_python.packages import get_package_share_directory as g, "
            "get_package_prefix as p; print(g('daptq_ros')); print(p('daptq_ros'))")
    env = dict(os.environ, AMENT_PREFIX_PATH=str(install_dir / "daptq_ros"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    share, prefix = out.stdout.split()
    assert Path(share) == install_dir / "daptq_ros" / "share" / "daptq_ros"
    assert Path(prefix) == install_dir / "daptq_ros"
