"""ONNX Runtime deployment core: no rclpy here (see daptq_ros.nodes for the ROS shell)."""
