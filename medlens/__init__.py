"""MedLens: calibrated, explainable, honestly evaluated medical image classifiers."""

import os

__version__ = "0.1.0"

# ONNX Runtime's Linux builds start a telemetry client when the library loads: it writes a
# device id and an event database under ~/.cache/Microsoft and a session file in $TMPDIR. MedLens
# promises to store nothing it was not asked to, so opt out before onnxruntime is imported
# (the variable is read once, at load). A user who wants it can set ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
