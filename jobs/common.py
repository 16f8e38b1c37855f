"""Helpers several commands share, so that no command imports another command's module.

Storage options (`--storage-option KEY=VALUE`, parsed one way everywhere), running a generation job
on the executor its spec names, printing its outcome or a model's description, and the options and
file access the identity-swapping commands (`disentangle`, `anonymize`) share.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from facegen.models.errors import UserError

if TYPE_CHECKING:  # torch and the spec (pydantic) load when a command runs, not when the CLI starts
    import torch

    from facegen.engine.spec import JobSpec


# -- storage options ---------------------------------------------------------------------------------
def add_storage_option(parser: argparse.ArgumentParser, what: str = "every URI") -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help=f"fsspec option for {what} (repeatable; dotted keys nest, values are JSON "
                             "when they parse, e.g. client_kwargs.endpoint_url=http://host:9000 anon=true)")


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs -> fsspec storage options. Dotted keys nest (`client_kwargs.endpoint_url=…`);
    values are parsed as JSON when they can be (numbers, booleans, objects), else kept as strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option: {pair!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UserError(f"--storage-option: {key!r} conflicts with an earlier non-nested value")
        target[leaf] = value
    return options


# -- generation jobs ---------------------------------------------------------------------------------
def execute_job(spec: JobSpec, resume: bool) -> dict:
    """Run a job on the executor `run.executor` names; returns its report."""
    progress = True  # a bar on a terminal, throttled lines elsewhere (engine.progress)
    if spec.run.executor == "ray":
        try:
            from facegen.cluster.executor import run_ray
        except ModuleNotFoundError as err:
            raise UserError("run.executor: the Ray executor is not available in this build; "
                            "use --executor local") from err
        return run_ray(spec, resume=resume, progress=progress)
    from facegen.engine.local import run_local

    return run_local(spec, resume=resume, progress=progress)


def print_job_summary(spec: JobSpec, report: dict) -> int:
    """Two lines about a finished job; the exit code is 1 if any sample violates the threshold."""
    cert = report["privacy_certificate"]
    print(f"wrote {report['samples']['written']} samples of {report['identities']['accepted']} identities "
          f"in {report['shards']['count']} shards to {spec.output.uri}")
    from facegen.engine.report import certificate_headline

    print(f"privacy: {certificate_headline(cert)[1]}; max real similarity {cert['max_real_similarity']}, "
          f"violations {cert['violations']}; report: {spec.output.uri.rstrip('/')}/report.html")
    return 0 if cert["violations"] == 0 else 1


# -- models ------------------------------------------------------------------------------------------
def describe_module(module: torch.nn.Module) -> dict[str, Any]:
    """Family, config, exact parameter count and content fingerprint of a registered module."""
    from facegen.models.checkpoint import family_of, fingerprint_module

    return {
        "family": family_of(module),
        "config": module.config.to_dict(),
        "parameters": sum(p.numel() for p in module.parameters()),
        "fingerprint": fingerprint_module(module),
    }


def print_info(info: dict[str, Any], as_json: bool) -> None:
    """A model description as one JSON object, or as `key: value` lines (the config indented)."""
    if as_json:
        print(json.dumps(info, sort_keys=True))
        return
    for key, value in info.items():
        if key == "config":
            print("config:")
            for name, v in value.items():
                print(f"  {name}: {json.dumps(v)}")
        else:
            print(f"{key}: {value}")


# -- identity swapping (disentangle, anonymize) --------------------------------------------------------
def comma_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers (`5,6,7`)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """A bench size list (`100,1e3,10000`) as positive integers; one clear error naming `flag` otherwise."""
    try:
        values = tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma list of integers") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: {text!r} must list positive integers")
    return values


def unit_widths(text: str) -> tuple[int, ...]:
    """argparse type: swap-unit widths, comma-separated channel counts or 'layer' (= 0, a whole layer)."""
    try:
        return tuple(0 if part.strip() == "layer" else int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'layer', got {text!r}") from None


def add_swap_models(parser: argparse.ArgumentParser) -> None:
    """--generator, --embedder and --preprocessing, as every identity-swapping command takes them."""
    from facegen.jobs.embedder_options import add_preprocessing_flag

    parser.add_argument("--generator", required=True,
                        help="generator checkpoint (facegen, ArcBiFaceGAN .pkl, rosinality/StyleID .pt)")
    parser.add_argument("--embedder", required=True,
                        help="face embedder (facegen iresnet, insightface .pth, .onnx)")
    add_preprocessing_flag(parser)


def add_seeded_face_options(parser: argparse.ArgumentParser, batch: int) -> None:
    """How seeded faces are drawn and measured: --seed, --truncation, --batch, --lowpass."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the faces (default: 0)")
    parser.add_argument("--truncation", type=float, default=0.7, help="truncation psi of the faces (default: 0.7)")
    parser.add_argument("--batch", type=int, default=batch, help=f"images per generator call (default: {batch})")
    parser.add_argument("--lowpass", type=int, default=16,
                        help="side of the low-pass image the appearance change is measured on (default: 16)")


def split_uri(uri: str):
    """(Storage of the folder, file name) of a local path or fsspec URI naming one file."""
    from facegen.engine.storage import Storage

    folder, _, name = uri.rpartition("/")
    if not name:
        raise UserError(f"{uri}: expected a file name")
    return Storage(folder or "."), name


def read_uri(uri: str) -> bytes:
    storage, name = split_uri(uri)
    if not storage.exists(name):
        raise UserError(f"{uri}: file not found")
    return storage.read_bytes(name)


def write_uri(uri: str, data: bytes) -> None:
    storage, name = split_uri(uri)
    storage.write_bytes(name, data)


def open_swap_space(generator_path: str):
    """The generator's `LatentSpaces` (W+ / StyleSpace, constant noise) for swapping."""
    from facegen.models.loading import load_generator
    from facegen.models.rendering import open_latent_spaces

    return open_latent_spaces(load_generator(generator_path))
