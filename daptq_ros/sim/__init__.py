"""daptq_ros.sim."""
