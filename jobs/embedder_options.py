"""The `--preprocessing KEY=VALUE` flag every command with `--embedder` takes, and how the chosen
preprocessing is reported (one line per decision on stderr: graph detection, the index, flags)."""

from __future__ import annotations

import argparse
import sys

# A copy of facegen.models.embedder.PREPROCESSING_KEYS: the CLI parser must start without torch
# (tests/jobs/test_embedder_options.py checks that they are equal).
PREPROCESSING_KEYS = ("input_size", "mean", "std", "channel_order", "resize_mode")

PREPROCESSING_HELP = (
    "embedder input preprocessing, repeatable KEY=VALUE with KEY in " + ", ".join(PREPROCESSING_KEYS)
    + "; mean/std on the [0,1] scale, one value or three comma-separated (e.g. mean=0 std=0.00392157 for raw "
    "0..255 pixels, channel_order=BGR). Default: what the index was built with when the weights match, else "
    "read from an ONNX graph (in-graph normalisation means raw pixels), else insightface's (x/255-0.5)/0.5 RGB")


def add_preprocessing_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preprocessing", action="append", default=[], metavar="KEY=VALUE", help=PREPROCESSING_HELP)


def preprocessing_flags(args: argparse.Namespace) -> dict:
    """The parsed `--preprocessing` overrides (checked: a bad key or value is a usage error)."""
    from facegen.models.embedder import parse_preprocessing

    return parse_preprocessing(getattr(args, "preprocessing", None) or [])


def print_notes(embedder) -> None:
    """Say how the embedder's preprocessing was chosen (stderr, so stdout stays machine-readable)."""
    for note in getattr(embedder, "notes", []):
        print(f"facegen: {note}", file=sys.stderr)
    print(f"facegen: embedder preprocessing: {embedder.preprocessing.to_json()}", file=sys.stderr)
