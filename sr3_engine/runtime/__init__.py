"""The runtime layer: the model directory format (`model_dir`), ONNX export as a library
(`onnx_export`), the engine backends (`backends`) and `SR3Engine` (`engine`)."""
