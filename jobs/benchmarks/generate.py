"""`facegen bench generate`: end-to-end candidates/s, facegen's batched pipeline vs the original's loop.

A *candidate* is one proposed face: render, embed, certify against every enrolled real identity.
Both sides run the same random-initialised models of the same size in the same process:
  - facegen: `Bundle.evaluate` (batched fast-path generator, batched embedder, one FAISS query
    per batch, every step on the device);
  - original-style baseline (ArcBiFaceGAN's generate_recognition_data.py): generator at batch 1
    (reference convolutions), embedder at batch 1, then a Python loop over every enrolled identity
    with one torch cosine each.
The baseline is timed on a few candidates (its privacy loop at 10^5 identities takes seconds per
candidate) and reported per candidate, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facegen.engine.bundle import Bundle
from facegen.engine.index.build import build_index
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.phases import conditions_for
from facegen.engine.seeding import Stream, draw_keys, normal
from facegen.engine.spec import build_spec
from facegen.engine.storage import Storage
from facegen.engine.transfer import compile_networks
from facegen.jobs.benchmarks import write_record
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.generator import Generator, GeneratorConfig, images_to_uint8
from facegen.models.iresnet import IResNet, IResNetConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="end-to-end candidates/s vs an original-style loop, same run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="enrolled identities, comma-separated")
    p.add_argument("--resolution", type=int, default=64, help="generator resolution")
    p.add_argument("--channel-base", type=int, default=16384, help="generator channel_base (ArcBiFaceGAN's)")
    p.add_argument("--embedder-depth", type=int, default=18, help="iResNet depth of the filter's embedder")
    p.add_argument("--embedder-width", type=int, default=64, help="iResNet base width (64 = insightface)")
    p.add_argument("--batch", type=int, default=32, help="facegen's batch size")
    p.add_argument("--candidates", type=int, default=64, help="candidates timed for facegen per size")
    p.add_argument("--baseline-candidates", type=int, default=2, help="candidates timed for the loop per size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="facegen's side with torch.compile'd networks, as run.compile (backend inductor unless "
                        "named, e.g. aot_eager); compiled during the untimed warm-up")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(img_resolution=args.resolution, channel_base=args.channel_base,
                                          num_fp16_res=0)).eval().requires_grad_(False)
    backbone = IResNet(IResNetConfig(depth=args.embedder_depth, base_width=args.embedder_width))
    embedder = TorchEmbedder(backbone, Preprocessing())
    ours_models = (generator, embedder)
    if args.compile:  # compiled copies (in place, as run.compile does): the loop keeps the eager modules
        ours_models = (copy.deepcopy(generator), copy.deepcopy(embedder))
        compile_networks(*ours_models, backend=args.compile)
    results = []
    print(f"{'enrolled':>9} {'facegen cand/s':>15} {'loop cand/s':>12} {'speed-up':>9}")
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            index = _random_index(folder, size, embedder)
            bundle = _bundle(*ours_models, index, args.batch)
            ours = _time_facegen(bundle, args.candidates)
            loop = _time_loop(bundle, index, args.baseline_candidates)
        row = {"enrolled": size, "facegen_candidates_per_s": ours, "loop_candidates_per_s": loop,
               "speedup": ours / loop}
        results.append(row)
        print(f"{size:>9} {ours:>15.2f} {loop:>12.3f} {row['speedup']:>8.1f}x")
    record = {"benchmark": "generate", "resolution": args.resolution, "embedder_depth": args.embedder_depth,
              "batch": args.batch, "threads": torch.get_num_threads(), "compile": args.compile, "results": results}
    write_record(args.json, record)
    return 0


def _random_index(folder: str, size: int, embedder: TorchEmbedder) -> PrivacyIndex:
    vectors = np.random.default_rng(size).normal(size=(size, embedder.dim)).astype(np.float32)
    names = [str(i) for i in range(size)]
    build_index(vectors, names, names, Storage(folder), embedder_fingerprint=embedder.fingerprint,
                preprocessing=embedder.preprocessing.to_dict())
    return PrivacyIndex.open(folder, backend="faiss")


def _bundle(generator, embedder, index, batch: int) -> Bundle:
    spec = build_spec({"batch_size": batch, "generator": {"path": "-"}, "embedder": {"path": "-"},
                       "index": {"uri": "-"}, "output": {"uri": "-"},
                       "privacy": {"threshold": 0.622}})
    return Bundle(generator, embedder, index, torch.device("cpu"), spec)


def _inputs(bundle: Bundle, count: int) -> tuple[np.ndarray, np.ndarray]:
    slots = np.arange(count)
    return conditions_for(bundle, slots), draw_keys(0, Stream.LATENT, slots, 0)


def _time_facegen(bundle: Bundle, count: int) -> float:
    conditions, keys = _inputs(bundle, count)
    bundle.evaluate(conditions, keys)  # warm-up (and, with --compile, compiling every batch shape)
    start = time.perf_counter()
    bundle.evaluate(conditions, keys)
    return count / (time.perf_counter() - start)


def _time_loop(bundle: Bundle, index: PrivacyIndex, count: int) -> float:
    """The original filter: batch 1 everywhere and a host-synchronised Python loop per identity."""
    g, embedder = bundle.generator, bundle.embedder
    real = [torch.from_numpy(v) for v in index.embeddings()]
    conditions, keys = _inputs(bundle, count)
    threshold = bundle.spec.privacy.value
    start = time.perf_counter()
    for i in range(count):
        z = torch.from_numpy(normal(keys[i:i + 1], g.z_dim))
        with torch.inference_mode():
            vis, _ = g(z, torch.from_numpy(conditions[i:i + 1]), truncation_psi=0.7, fast=False)
            feature = embedder.embed(images_to_uint8(vis))[0]
            passed = True
            for enrolled in real:
                if abs(torch.nn.functional.cosine_similarity(feature, enrolled, dim=0).item()) > threshold:
                    passed = False
        del passed
    return count / (time.perf_counter() - start)
