"""Numbers about predictions: metrics with intervals, calibration, the out-of-distribution guard."""
