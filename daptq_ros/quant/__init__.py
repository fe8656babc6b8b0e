"""daptq_ros.quant."""
