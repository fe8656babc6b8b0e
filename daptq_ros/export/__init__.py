"""daptq_ros.export."""
