"""Torch modules and checkpoint I/O: the lowest layer. Imports only torch, numpy and safetensors (and
onnxruntime lazily), so the networks load anywhere; tests/test_layering.py enforces it."""
