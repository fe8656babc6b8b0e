"""Launch the daptq_ros policy node (and, with sim:=true, the Meta-World bridge).

    ros2 launch daptq_ros policy.launch.py artifact_dir:=/path/to/artifact
    ros2 launch daptq_ros policy.launch.py artifact_dir:=... sim:=true namespace:=robot1

Where ``ros2 launch`` is not available (PyPI ROS 2 wheels), ``daptq launch policy [--sim]``
starts the same graph with the same params file and remappings. The literal values below are
duplicated from ``daptq_ros/launcher.py`` (launch files do not import the package);
``test/test_launch_consistency.py`` checks that both agree.
"""

# ruff: noqa: I001  (the repo's launch/ folder makes ruff treat `launch` as first-party)
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "daptq_ros"
PARAMS_FILE = "config/policy.yaml"
# node name -> executable (console script)
NODES = {"policy_node": "policy_node", "sim_bridge": "sim_bridge"}

# launch argument -> (default topic, description); topics are relative to the namespace.
TOPICS = {
    "image_topic": ("camera/image", "camera image topic (sensor_msgs/Image, sensor-data QoS)"),
    "instruction_topic": ("instruction", "language instruction topic (std_msgs/String)"),
    "joint_states_topic": ("joint_states", "robot state topic (sensor_msgs/JointState)"),
    "joint_command_topic": ("joint_command", "joint command topic (JointState or JointTrajectory)"),
    "ee_command_topic": ("ee_command", "end-effector command topic (TwistStamped or PoseStamped)"),
}
# (node-relative topic, launch argument giving its remapped name)
POLICY_REMAPPINGS = [
    ("~/image", "image_topic"),
    ("~/instruction", "instruction_topic"),
    ("~/joint_states", "joint_states_topic"),
    ("~/joint_command", "joint_command_topic"),
    ("~/ee_command", "ee_command_topic"),
]
SIM_REMAPPINGS = [
    ("~/image", "image_topic"),
    ("~/instruction", "instruction_topic"),
    ("~/joint_states", "joint_states_topic"),
    ("~/command", "joint_command_topic"),
]


def generate_launch_description() -> LaunchDescription:
    """Launch arguments: artifact_dir, params_file, namespace, use_sim_time, sim, *_topic."""
    artifact_dir = LaunchConfiguration("artifact_dir")
    params_file = LaunchConfiguration("params_file")
    namespace = LaunchConfiguration("namespace")
    use_sim_time = LaunchConfiguration("use_sim_time")
    arguments = [
        DeclareLaunchArgument(
            "artifact_dir",
            description="exported artifact directory (model.onnx, manifest.json, instructions.safetensors)",
        ),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), PARAMS_FILE]),
            description="ROS 2 parameters file for policy_node and sim_bridge",
        ),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of all nodes"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock time"),
        DeclareLaunchArgument(
            "sim", default_value="false",
            description="also start sim_bridge (Meta-World MT10 in lockstep with the policy)",
        ),
    ]
    arguments += [
        DeclareLaunchArgument(name, default_value=topic, description=text)
        for name, (topic, text) in TOPICS.items()
    ]
    policy_node = Node(
        package=PACKAGE,
        executable=NODES["policy_node"],
        name="policy_node",
        namespace=namespace,
        parameters=[params_file, {"artifact_dir": artifact_dir, "use_sim_time": use_sim_time}],
        remappings=[(src, LaunchConfiguration(arg)) for src, arg in POLICY_REMAPPINGS],
        output="screen",
        emulate_tty=True,
    )
    sim_bridge = Node(
        package=PACKAGE,
        executable=NODES["sim_bridge"],
        name="sim_bridge",
        namespace=namespace,
        parameters=[params_file, {"use_sim_time": use_sim_time}],
        remappings=[(src, LaunchConfiguration(arg)) for src, arg in SIM_REMAPPINGS],
        output="screen",
        emulate_tty=True,
        condition=IfCondition(LaunchConfiguration("sim")),
    )
    return LaunchDescription([*arguments, policy_node, sim_bridge])
