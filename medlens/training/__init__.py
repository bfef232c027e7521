"""Training: stages, the fit loop, calibration and the OOD guard fit."""
