"""daptq_ros.drift."""
