"""Export of the core's networks: ONNX (with ONNX Runtime graph fusion) and AOTInductor packages.
Used by engine builds only; nothing on the run-time path imports it."""
