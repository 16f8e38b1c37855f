"""Test helpers: tiny networks and StyleGAN2-ADA-format snapshot pickles written from OUR modules.

The pickles are built like upstream's `torch_utils.persistence` writes them: every network reduces to
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with `meta = {type, version, module_src,
class_name, state}`, kwargs as `dnnlib.util.EasyDict`, tensors pickled the ordinary torch way. The
`torch_utils` / `dnnlib` modules exist in `sys.modules` only while writing.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from facegen.models.discriminator import Discriminator, DiscriminatorConfig
from facegen.models.generator import Generator, GeneratorConfig

TINY_G = dict(z_dim=16, c_dim=8, w_dim=16, img_resolution=16, img_channels=3, nir_channels=1,
              mapping_layers=2, channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=256)
TINY_D = dict(c_dim=8, img_resolution=16, img_channels=3, channel_base=128, channel_max=16,
              num_fp16_res=0, conv_clamp=256, mapping_layers=2, mbstd_group_size=2)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and buffer with random values (noise strengths and w_avg are 0 at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if "resample_filter" in name or not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen) * 0.5
            tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def tiny_generator(seed: int = 0, **overrides: Any) -> Generator:
    return randomize(Generator(GeneratorConfig(**{**TINY_G, **overrides})), seed)


def tiny_discriminator(seed: int = 1, **overrides: Any) -> Discriminator:
    return randomize(Discriminator(DiscriminatorConfig(**{**TINY_D, **overrides})), seed)


class _Persistent:
    """Reduces exactly like a `@persistence.persistent_class` instance."""

    def __init__(self, reconstruct: Any, meta: dict) -> None:
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


class _Payload:
    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@contextmanager
def fake_upstream_modules():
    """Temporary `torch_utils.persistence` and `dnnlib.util` so pickle can name their globals."""
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # never called: tests only write with it
        raise AssertionError("the fake reconstruct function must never run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    easy_dict = type("EasyDict", (dict,), {"__module__": "dnnlib.util", "__qualname__": "EasyDict"})
    util.EasyDict = easy_dict
    fakes = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    with mock.patch.dict(sys.modules, fakes):
        yield persistence, util


def marker_source(marker: Path) -> str:
    """Python source that would create `marker` if anybody exec'd it."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"


def persistent_tree(module: torch.nn.Module, class_name: str, module_src: str, reconstruct: Any,
                    init_kwargs: dict | None = None, init_key: str = "_init_kwargs",
                    init_args: tuple = ()) -> _Persistent:
    """Our module tree as nested persistent objects with upstream's `__dict__` layout."""
    state = {
        "training": False,
        "_parameters": OrderedDict(module._parameters),
        "_buffers": OrderedDict(module._buffers),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": OrderedDict(),
        "_forward_hooks": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_modules": OrderedDict(
            (n, None if m is None else persistent_tree(m, type(m).__name__, module_src, reconstruct))
            for n, m in module._modules.items()),
        init_key.replace("kwargs", "args"): init_args,
        init_key: init_kwargs if init_kwargs is not None else {},
    }
    meta = {"type": "class", "version": 6, "module_src": module_src, "class_name": class_name, "state": state}
    return _Persistent(reconstruct, meta)


def g_init_kwargs(easy_dict: type, cfg: GeneratorConfig) -> dict:
    return {"z_dim": cfg.z_dim, "w_dim": cfg.w_dim, "c_dim": cfg.c_dim, "img_resolution": cfg.img_resolution,
            "img_channels": cfg.img_channels,
            "mapping_kwargs": easy_dict(num_layers=cfg.mapping_layers),
            "synthesis_kwargs": easy_dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                                          num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp)}


def d_init_kwargs(easy_dict: type, cfg: DiscriminatorConfig) -> dict:
    return {"c_dim": cfg.c_dim, "img_resolution": cfg.img_resolution, "img_channels": cfg.img_channels,
            "architecture": cfg.architecture, "channel_base": cfg.channel_base, "channel_max": cfg.channel_max,
            "num_fp16_res": cfg.num_fp16_res, "conv_clamp": cfg.conv_clamp,
            "block_kwargs": easy_dict(), "mapping_kwargs": easy_dict(num_layers=cfg.mapping_layers),
            "epilogue_kwargs": easy_dict(mbstd_group_size=cfg.mbstd_group_size)}


def write_snapshot(path: Path, marker: Path, G_ema: Generator, G: Generator | None = None,
                   D: Discriminator | None = None, D_NIR: Discriminator | None = None,
                   augment_p: float | None = None, extra: dict | None = None, protocol: int = 4) -> Path:
    """An ArcBiFaceGAN-style `network-snapshot-*.pkl` holding the given networks."""
    src = marker_source(marker)
    with fake_upstream_modules() as (persistence, util):
        rec = persistence._reconstruct_persistent_obj
        data: dict[str, Any] = {"training_set_kwargs": {"class_name": "training.dataset.ImageFolderDataset",
                                                        "path": "/data/VIS", "use_labels": True,
                                                        "max_size": 10, "xflip": False, "resolution": 16}}
        for name, net in (("G", G), ("D", D), ("G_ema", G_ema), ("D_NIR", D_NIR)):
            if net is None:
                continue
            kwargs = (g_init_kwargs if name.startswith("G") else d_init_kwargs)(util.EasyDict, net.config)
            cls = "Generator" if name.startswith("G") else "Discriminator"
            data[name] = persistent_tree(net, cls, src, rec, kwargs)
        pipe = None
        if augment_p is not None:
            pipe_state = {"_parameters": OrderedDict(), "_buffers": OrderedDict(p=torch.tensor(augment_p)),
                          "_modules": OrderedDict(), "_init_args": (), "_init_kwargs": {"xflip": 1.0}}
            pipe = _Persistent(rec, {"type": "class", "version": 6, "module_src": src,
                                     "class_name": "AugmentPipe", "state": pipe_state})
        data["augment_pipe"] = pipe
        data.update(extra or {})
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def payload(func: Any, *args: Any) -> _Payload:
    return _Payload(func, args)
