"""The demo models shipped inside facegen, trained by facegen's own commands on the procedural world.

```python
from facegen.models.demo import demo_facts, demo_model_paths

paths = demo_model_paths()   # {"embedder": Path, "generator": Path, "facts": Path}; only files that exist
facts = demo_facts()         # demo.json: the world the models were trained on, their hashes and figures
```

- `embedder`: a native `.safetensors` iResNet (`facegen.models.loading.load_embedder`), trained with
  `facegen train-fr` on VIS and NIR images of world identities (seed, size: `facts["world"]`).
- `generator`: a native `.safetensors` dual-branch (VIS + NIR) generator trained with `facegen train`
  on the same world, conditioned on the embedder's features (`facegen features`).
- `facts`: `demo.json`, what the models expect and what was measured on held-out world identities
  (`facts["embedder"]["verification"]`, the calibrated `threshold`), and each file's SHA-256.

A key is present only when its file is part of this installation, so callers can tell a missing model
from a broken one. `python -m facegen.jobs.demo_models --out DIR` reproduces every file
(docs/demo-models.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FILES = {"embedder": "embedder.safetensors", "generator": "generator.safetensors", "facts": "demo.json"}


def demo_model_paths() -> dict[str, Path]:
    """Shipped demo files by role ("embedder", "generator", "facts"), only those present."""
    return {role: HERE / name for role, name in FILES.items() if (HERE / name).is_file()}


def demo_facts() -> dict[str, Any]:
    """demo.json as a dict (empty when it is not shipped)."""
    path = demo_model_paths().get("facts")
    return json.loads(path.read_text()) if path is not None else {}
