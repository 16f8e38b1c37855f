"""Importers: turn checkpoints in other projects' formats into our native modules, never executing code."""
