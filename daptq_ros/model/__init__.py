"""daptq_ros.model."""
