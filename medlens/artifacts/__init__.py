"""The one owner of files: run and model folders, ONNX graphs and sessions, model cards."""
