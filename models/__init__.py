"""Torch modules and checkpoint I/O. Imports only torch, numpy and safetensors (see DESIGN.md)."""
