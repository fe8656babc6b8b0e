"""daptq_ros.nodes."""
