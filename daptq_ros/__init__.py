"""daptq_ros: drift-aware post-training quantization for VLA robot policies, deployable on ROS 2.

The library (model, sim, quant, export, runtime, drift) never imports rclpy; only
`daptq_ros.nodes` does.
"""

__version__ = "0.1.0"
