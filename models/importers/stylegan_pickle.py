"""Import StyleGAN2-ADA / ArcBiFaceGAN training snapshots (`network-snapshot-*.pkl`: a plain pickle of
G, D, G_ema, augment_pipe, training_set_kwargs, and ArcBiFaceGAN's D_NIR).

The pickle is read by `safe_pickle.RestrictedUnpickler` (no code from the file is run; its
`module_src` is never looked at). Each network comes back as a `PersistentRecord`; we flatten its
`_parameters`/`_buffers`/`_modules` into a state dict with dotted names, rebuild our config from
its `_init_kwargs` with StyleGAN2-ADA's defaults for absent keys, and load strictly into our module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from facegen.models.checkpoint import load_state_dict_checked
from facegen.models.discriminator import Discriminator, DiscriminatorConfig
from facegen.models.errors import UserError
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.importers.safe_pickle import ModuleRecord, PersistentRecord, load_restricted_pickle

NETWORK_KEYS = ("G", "D", "G_ema", "D_NIR")

# StyleGAN2-ADA constructor signatures (training/networks.py): positional order and defaults.
_G_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs",
                 "synthesis_kwargs")
_D_POSITIONAL = ("c_dim", "img_resolution", "img_channels", "architecture", "channel_base", "channel_max",
                 "num_fp16_res", "conv_clamp", "cmap_dim", "block_kwargs", "mapping_kwargs", "epilogue_kwargs")
_SYNTHESIS_DEFAULTS = {"channel_base": 32768, "channel_max": 512, "num_fp16_res": 0, "conv_clamp": None}
_MAPPING_DEFAULTS = {"num_layers": 8, "embed_features": None, "layer_features": None, "lr_multiplier": 0.01,
                     "w_avg_beta": 0.995}
# Keys whose upstream value we reproduce only at this setting (anything else changes the math).
_FIXED = {"architecture": "skip", "activation": "lrelu", "resample_filter": [1, 3, 3, 1], "use_noise": True}
_IGNORED = {"fp16_channels_last", "channels_last", "class_name"}  # layout/bookkeeping only


def _record_label(record: Any) -> str:
    return getattr(record, "class_name", type(record).__name__)


def flatten_state_dict(record: PersistentRecord | ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Dotted-name tensors of a network record, recursing through `_modules`; None entries skipped."""
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"{prefix}{name}: expected a tensor, got {type(tensor).__name__}")
            out[f"{prefix}{name}"] = tensor
    for name, sub in (state.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, (PersistentRecord, ModuleRecord)) or not hasattr(sub, "state"):
            raise UserError(f"{prefix}{name}: sub-module is a {type(sub).__name__}, not a pickled module")
        out.update(flatten_state_dict(sub, f"{prefix}{name}."))
    return out


def init_kwargs(record: PersistentRecord, positional: tuple[str, ...]) -> dict[str, Any]:
    """The constructor arguments a persistent object was built with, positional ones named."""
    state = record.state
    args = state.get("_init_args", state.get("init_args")) or ()
    kwargs = state.get("_init_kwargs", state.get("init_kwargs"))
    if kwargs is None:
        raise UserError(f"{record.class_name}: no init_kwargs recorded (not a persistent StyleGAN2-ADA network)")
    if len(args) > len(positional):
        raise UserError(f"{record.class_name}: {len(args)} positional init args, expected at most {len(positional)}")
    merged = {**dict(zip(positional, args)), **_plain(kwargs)}
    return merged


def _plain(value: Any) -> Any:
    """EasyDict stand-ins and OrderedDicts -> plain dicts, recursively; tuples -> lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_fixed(where: str, kwargs: Mapping[str, Any], allowed: set[str]) -> None:
    for key, value in kwargs.items():
        if key in _FIXED:
            if _plain(value) != _FIXED[key]:
                raise UserError(f"{where}.{key}={value!r}: only {_FIXED[key]!r} is supported")
        elif key not in allowed and key not in _IGNORED:
            raise UserError(f"{where}.{key}: unsupported StyleGAN2-ADA argument")


def generator_config(record: PersistentRecord, tensors: Mapping[str, torch.Tensor]) -> GeneratorConfig:
    """GeneratorConfig from a G record's init kwargs; nir_channels (not stored) from the `toseg` tensors."""
    kw = init_kwargs(record, _G_POSITIONAL)
    mapping = {**_MAPPING_DEFAULTS, **(kw.pop("mapping_kwargs", None) or {})}
    synthesis = {**_SYNTHESIS_DEFAULTS, **(kw.pop("synthesis_kwargs", None) or {})}
    _check_fixed("G.init_kwargs", kw, {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"})
    _check_fixed("G.mapping_kwargs", mapping, set(_MAPPING_DEFAULTS))
    _check_fixed("G.synthesis_kwargs", synthesis, set(_SYNTHESIS_DEFAULTS))
    toseg = [t for k, t in tensors.items() if k.endswith(".toseg.weight")]
    try:
        return GeneratorConfig(
            z_dim=kw["z_dim"], c_dim=kw["c_dim"], w_dim=kw["w_dim"], img_resolution=kw["img_resolution"],
            img_channels=kw["img_channels"], nir_channels=int(toseg[0].shape[0]) if toseg else 0,
            mapping_layers=mapping["num_layers"], channel_base=synthesis["channel_base"],
            channel_max=synthesis["channel_max"], num_fp16_res=synthesis["num_fp16_res"],
            conv_clamp=synthesis["conv_clamp"], mapping_lr_multiplier=mapping["lr_multiplier"],
            w_avg_beta=mapping["w_avg_beta"], embed_features=mapping["embed_features"],
            layer_features=mapping["layer_features"])
    except KeyError as err:
        raise UserError(f"G.init_kwargs: missing {err.args[0]}") from None


def discriminator_config(record: PersistentRecord, name: str = "D") -> DiscriminatorConfig:
    """DiscriminatorConfig from a D / D_NIR record, with StyleGAN2-ADA's defaults for absent keys."""
    kw = {"architecture": "resnet", "channel_base": 32768, "channel_max": 512, "num_fp16_res": 0,
          "conv_clamp": None, "cmap_dim": None, **init_kwargs(record, _D_POSITIONAL)}
    block = kw.pop("block_kwargs", None) or {}
    mapping = {"num_layers": 8, "lr_multiplier": 0.01, **(kw.pop("mapping_kwargs", None) or {})}
    epilogue = {"mbstd_group_size": 4, "mbstd_num_channels": 1, **(kw.pop("epilogue_kwargs", None) or {})}
    architecture = kw.pop("architecture")
    _check_fixed(f"{name}.init_kwargs", kw, {"c_dim", "img_resolution", "img_channels", "channel_base",
                                             "channel_max", "num_fp16_res", "conv_clamp", "cmap_dim"})
    _check_fixed(f"{name}.block_kwargs", block, {"freeze_layers"})
    _check_fixed(f"{name}.mapping_kwargs", mapping, {"num_layers", "lr_multiplier"})
    _check_fixed(f"{name}.epilogue_kwargs", epilogue, {"mbstd_group_size", "mbstd_num_channels"})
    try:
        return DiscriminatorConfig(
            c_dim=kw["c_dim"], img_resolution=kw["img_resolution"], img_channels=kw["img_channels"],
            architecture=architecture, channel_base=kw["channel_base"], channel_max=kw["channel_max"],
            num_fp16_res=kw["num_fp16_res"], conv_clamp=kw["conv_clamp"], cmap_dim=kw["cmap_dim"],
            mapping_layers=mapping["num_layers"], mapping_lr_multiplier=mapping["lr_multiplier"],
            mbstd_group_size=epilogue["mbstd_group_size"], mbstd_num_channels=epilogue["mbstd_num_channels"],
            freeze_layers=block.get("freeze_layers", 0))
    except KeyError as err:
        raise UserError(f"{name}.init_kwargs: missing {err.args[0]}") from None


def read_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """The snapshot dict with networks as records. A bare pickled Generator counts as `G_ema`."""
    data = load_restricted_pickle(path)
    if isinstance(data, PersistentRecord) and data.class_name == "Generator":
        return {"G_ema": data}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a snapshot dict with 'G_ema', got {type(data).__name__}")
    return data


def network_from_record(record: Any, what: str, source: str) -> torch.nn.Module:
    """Build our module for snapshot entry `what` (G, G_ema, D, D_NIR) and load it strictly."""
    if not isinstance(record, PersistentRecord):
        raise UserError(f"{source}: '{what}' is a {type(record).__name__}, not a persistent network")
    where = f"{source} [{what}]"
    try:
        tensors = flatten_state_dict(record)
        if what in ("G", "G_ema"):
            module: torch.nn.Module = Generator(generator_config(record, tensors))
        else:
            module = Discriminator(discriminator_config(record, what))
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    except RecursionError:  # the pickle memo can build cycles; a real network tree is shallow
        raise UserError(f"{where}: module tree or init_kwargs nested too deeply (cyclic?)") from None
    except (TypeError, ValueError) as err:  # e.g. a config value of the wrong type
        raise UserError(f"{where}: unusable init_kwargs ({err})") from None
    load_state_dict_checked(module, tensors, where)
    return module.eval()


def load_stylegan_pickle(path: str | os.PathLike, what: tuple[str, ...] = ("G_ema",),
                         optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """`{name: module}` for each entry of `what` (required) and `optional` (None when absent), plus
    `augment_p` (the ADA probability, or None) and `training_set_kwargs`."""
    source = str(Path(path))
    snapshot = read_snapshot(path)
    unknown = [w for w in (*what, *optional) if w not in NETWORK_KEYS]
    if unknown:
        raise UserError(f"{source}: cannot extract {unknown}; choose from {list(NETWORK_KEYS)}")
    missing = [w for w in what if snapshot.get(w) is None]
    if missing:
        present = [k for k in NETWORK_KEYS if snapshot.get(k) is not None]
        raise UserError(f"{source}: snapshot has no {missing} (it has {present})")
    out: dict[str, Any] = {w: network_from_record(snapshot[w], w, source) for w in what}
    for w in optional:
        out[w] = network_from_record(snapshot[w], w, source) if snapshot.get(w) is not None else None
    pipe = snapshot.get("augment_pipe")
    p = flatten_state_dict(pipe).get("p") if isinstance(pipe, PersistentRecord) else None
    out["augment_p"] = float(p.reshape(-1)[0]) if p is not None and p.numel() else None
    try:
        out["training_set_kwargs"] = _plain(snapshot.get("training_set_kwargs") or {})
    except RecursionError:
        raise UserError(f"{source}: training_set_kwargs nested too deeply (cyclic?)") from None
    return out
