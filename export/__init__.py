"""Lowest layer: model families, weight loading, the stage plan and the dilated-middle variant.

Export to ONNX and the per-network specs build on these; `engine` and `runtime` import from here.
"""
