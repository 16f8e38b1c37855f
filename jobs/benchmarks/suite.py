"""`facegen bench suite`: the whole throughput and correctness picture of one machine, in one command.

Sections (each time-boxed; a section that runs out of time records what it skipped):
  environment  device, driver, library versions, the peak FLOP/s table entry used for the rooflines
  correctness  generator fp32 vs bf16 (and fp16 on CUDA) on the same weights: max |diff| and uint8
               level changes; embedder fp32 vs reduced precision on the same images: cosine agreement
               and the largest similarity change (the margin an fp32 recheck needs); the index's
               search backends (faiss-gpu on CUDA) against exact float64 search: identical top-1
  generator    images/s of the ArcBiFaceGAN 256² generator for batches 1…256, both modulated-conv
               paths (shared NHWC, fused grouped), per precision, and the share of the roofline
  embedder     images/s of iResNet-100 (uint8 256² in, resize to 112² included) at the same batches
  evaluate     `Bundle.evaluate` candidates/s: render + embed + privacy query, as every phase runs it
  privacy      exact privacy query, µs per candidate at 10⁶ and 10⁷ enrolled rows
  png          PNG encode images/s per core (the shard encoder's settings), and the cores one
               device needs to keep up with the generator
  end_to_end   the demo job through the local executor: samples/s and candidates/s
  overlap      the same job with shard writing overlapped (`run.overlap`) and not: phase 3 wall time,
               compute / write / wait seconds, and the shards of both byte for byte
  compile      `Bundle.evaluate` with `run.compile` (torch.compile, inductor) vs eager: compile time,
               candidates/s, largest difference of embeddings and privacy similarities
  train        `facegen bench train`'s in-process phase breakdown: s/kimg per phase

Roofline share = achieved FLOP/s ÷ the device's peak for the precision used, where achieved FLOP/s =
items/s × FLOPs per item counted by `torch.utils.flop_counter` (convolutions and matrix products).
GPU peaks are dense (no sparsity) vendor figures (PEAK_TFLOPS); a CPU's is cores × clock × FLOPs per
cycle of its vector units (stated in the environment section). `--quick` runs the same code with tiny
models and sizes (CI, any CPU); on a GPU machine the full suite is the one command needed:
    facegen bench suite --json suite.json --markdown suite.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facegen.jobs.benchmarks import write_record
from facegen.jobs.benchmarks.roofline import count_flops, device_peak, share
from facegen.jobs.benchmarks.suite_report import format_markdown
from facegen.jobs.common import positive_ints
from facegen.models.errors import UserError

SECTIONS = ("environment", "correctness", "generator", "embedder", "evaluate", "privacy", "png", "end_to_end",
            "overlap", "compile", "train")

@dataclass(frozen=True)
class Plan:
    """Model sizes, batch sizes and per-section time budgets (seconds) of one suite run."""

    resolution: int = 256
    channel_base: int = 16384
    channel_max: int = 512
    z_dim: int = 512
    c_dim: int = 512
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    embedder_depth: int = 100
    embedder_width: int = 64
    embedder_input: int = 112
    embedding_dim: int = 512
    correctness_batch: int = 16
    gallery: int = 100_000
    evaluate_batch: int = 64
    evaluate_candidates: int = 256
    evaluate_enrolled: int = 100_000
    privacy_sizes: tuple[int, ...] = (1_000_000, 10_000_000)
    privacy_queries: int = 4096
    png_images: int = 64
    png_processes: int = 0  # 0 = every core
    min_seconds: float = 0.5  # each timing repeats its step for at least this long
    overlap_samples_per_shard: int = 32
    budgets: dict[str, float] = field(default_factory=lambda: {
        "environment": 5, "correctness": 30, "generator": 90, "embedder": 40, "evaluate": 30,
        "privacy": 60, "png": 10, "end_to_end": 30, "overlap": 45, "compile": 60, "train": 60})


FULL = Plan()
QUICK = Plan(resolution=32, channel_base=256, channel_max=32, z_dim=32, c_dim=32, batches=(1, 2),
             embedder_depth=18, embedder_width=8, embedder_input=32, embedding_dim=32, correctness_batch=2,
             gallery=500, evaluate_batch=2, evaluate_candidates=4, evaluate_enrolled=500,
             privacy_sizes=(1000, 4000), privacy_queries=64, png_images=4, png_processes=1, min_seconds=0.0,
             overlap_samples_per_shard=2,
             # generous boxes: on a shared CI machine counting FLOPs alone can take half a minute
             budgets={"environment": 10, "correctness": 30, "generator": 90, "embedder": 60, "evaluate": 60,
                      "privacy": 30, "png": 10, "end_to_end": 120, "overlap": 120, "compile": 300, "train": 120})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "suite", help="every throughput and correctness figure in one time-boxed run (GPU: < 8 min)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sizes, same code (CI; a minute on a CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list out of {', '.join(SECTIONS)}")
    parser.add_argument("--batches", default=None, help="override the generator/embedder batch sizes (comma list)")
    parser.add_argument("--privacy-sizes", default=None, help="override the enrolled-row counts (comma list)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the full record here")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="write the markdown tables here (they are printed either way)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    plan = _plan(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    suite = Suite(device, plan, quick=args.quick)
    started = time.perf_counter()
    record: dict[str, Any] = {"benchmark": "suite", "quick": args.quick, "device": str(device),
                              "plan": asdict(plan), "sections": {}}
    for name in sections:
        print(f"[suite] {name} (budget {plan.budgets[name]:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = getattr(suite, name)(Deadline(plan.budgets[name]))
        except Exception as err:  # one broken section must not lose the others' figures
            result = {"error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.perf_counter() - t0, 3)
        record["sections"][name] = result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - started, 3)
    text = format_markdown(record)
    print(text)
    write_record(args.json, record)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    failed = [n for n, r in record["sections"].items() if "error" in r]
    if failed:
        print(f"[suite] sections with errors: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _device(name: str | None) -> torch.device:
    from facegen.models.devices import resolve_device

    return resolve_device(name or "auto", what="--device")


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.batches:
        plan = replace(plan, batches=positive_ints(args.batches, "--batches"))
    if args.privacy_sizes:
        plan = replace(plan, privacy_sizes=positive_ints(args.privacy_sizes, "--privacy-sizes"))
    return plan


class Deadline:
    """A section's time box: loops ask `expired()` before starting the next measurement."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def expired(self) -> bool:
        return time.perf_counter() >= self.end

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())


def reduced_dtypes(device: torch.device) -> list[str]:
    """bf16 everywhere (CPU autocast); fp16 only on CUDA, where ArcBiFaceGAN runs it."""
    return ["bf16", "fp16"] if device.type == "cuda" else ["bf16"]


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device, min_seconds: float, max_iters: int = 20) -> float:
    """Seconds per call of `step`: one untimed warm-up, then calls until `min_seconds` have passed."""
    step()
    sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        step()
        iters += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or iters >= max_iters:
            return elapsed / iters


class Suite:
    """The sections; models are built once (random weights: throughput does not depend on values)."""

    def __init__(self, device: torch.device, plan: Plan, quick: bool):
        self.device, self.plan, self.quick = device, plan, quick
        self.peak = device_peak(device)
        self._models: tuple | None = None
        self.flops: dict[str, int] = {}
        self.best_generator_rate: float | None = None
        self.compile_backend = "aot_eager" if quick else "inductor"

    # ----- models -----------------------------------------------------------------------------------
    def models(self):
        if self._models is None:
            from facegen.models.embedder import Preprocessing, TorchEmbedder
            from facegen.models.generator import Generator, GeneratorConfig
            from facegen.models.iresnet import IResNet, IResNetConfig

            p = self.plan
            torch.manual_seed(0)
            # num_fp16_res=4: ArcBiFaceGAN's configuration; its fp16 blocks only run on CUDA in 'fp16'.
            generator = Generator(GeneratorConfig(
                z_dim=p.z_dim, c_dim=p.c_dim, w_dim=p.z_dim, img_resolution=p.resolution,
                channel_base=p.channel_base, channel_max=p.channel_max, num_fp16_res=4,
                mapping_layers=8 if not self.quick else 2)).eval().requires_grad_(False).to(self.device)
            module = IResNet(IResNetConfig(depth=p.embedder_depth, embedding_dim=p.embedding_dim,
                                           input_size=p.embedder_input, base_width=p.embedder_width))
            embedder = TorchEmbedder(module.eval().requires_grad_(False),
                                     Preprocessing(input_size=p.embedder_input)).to(self.device)
            self._models = (generator, embedder)
        return self._models

    def latents(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.plan.z_dim, generator=g)
        c = torch.nn.functional.normalize(torch.randn(n, self.plan.c_dim, generator=g), dim=1) * 4.0
        return z.to(self.device), c.to(self.device)

    def render(self, z, c, dtype: str, path: str = "shared") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generator as `Bundle.render` runs it: fp32 blocks, or autocast bf16/fp16; 'fp16' on
        CUDA without autocast would be ArcBiFaceGAN's fp16 blocks, which `Bundle` does not use."""
        generator, _ = self.models()
        shared = path == "shared"
        with torch.inference_mode(), autocast(self.device, dtype):
            ws = generator.mapping(z, c, truncation_psi=0.7)
            return generator.synthesis(ws, noise_mode="const", fast=not shared, channels_last=shared,
                                       force_fp32=True)

    def embedder_at(self, dtype: str):
        _, embedder = self.models()
        if dtype == "fp32":
            return embedder
        reduced = copy.copy(embedder)
        reduced.autocast_dtype = DTYPES[dtype]
        return reduced

    def generator_flops(self) -> int:
        if "generator" not in self.flops:
            z, c = self.latents(1)
            self.flops["generator"] = count_flops(lambda: self.render(z, c, "fp32"))
        return self.flops["generator"]

    def embedder_flops(self) -> int:
        if "embedder" not in self.flops:
            images = torch.zeros(1, 3, self.plan.resolution, self.plan.resolution, dtype=torch.uint8,
                                 device=self.device)
            self.flops["embedder"] = count_flops(lambda: self.models()[1].embed(images))
        return self.flops["embedder"]

    # ----- sections ---------------------------------------------------------------------------------
    def environment(self, deadline: Deadline) -> dict:
        import faiss

        from facegen.engine.index import faiss_has_gpu

        versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                    "faiss": getattr(faiss, "__version__", "?"), "faiss_gpu": faiss_has_gpu()}
        for module in ("ray", "PIL"):
            with contextlib.suppress(ImportError):
                versions[module] = __import__(module).__version__
        env = {"versions": versions, "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "peak": self.peak}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                       gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                       matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        return env

    def correctness(self, deadline: Deadline) -> dict:
        from facegen.models.generator import images_to_uint8

        n = self.plan.correctness_batch
        z, c = self.latents(n, seed=1)
        out: dict[str, Any] = {"batch": n, "generator": {}, "embedder": {}}
        vis32, nir32 = self.render(z, c, "fp32")
        u32 = images_to_uint8(vis32)
        rng = np.random.default_rng(0)
        gallery = _unit_rows(rng, self.plan.gallery, self.plan.embedding_dim)
        e32 = self.models()[1].embed(u32).float()
        sims32 = e32.cpu().numpy() @ gallery.T
        for dtype in reduced_dtypes(self.device):
            if deadline.expired():
                out["generator"][dtype] = out["embedder"][dtype] = {"skipped": "time budget"}
                continue
            vis, nir = self.render(z, c, dtype)
            levels = (images_to_uint8(vis).int() - u32.int()).abs()
            out["generator"][dtype] = {
                "max_abs_diff": float((vis.float() - vis32).abs().max()),
                "nir_max_abs_diff": None if nir is None else float((nir.float() - nir32).abs().max()),
                "uint8_changed_fraction": float((levels > 0).float().mean()),
                "uint8_max_level_change": int(levels.max()),
            }
            # Same uint8 images, embedder in reduced precision: what an fp32 recheck must cover.
            e = self.embedder_at(dtype).embed(u32).float()
            cos = (e * e32).sum(dim=1).cpu().numpy()
            sims = e.cpu().numpy() @ gallery.T
            out["embedder"][dtype] = {
                "min_cosine_to_fp32": float(cos.min()), "mean_cosine_to_fp32": float(cos.mean()),
                "max_similarity_change": float(np.abs(sims - sims32).max()),
                "bound_from_cosine": float(np.sqrt(max(0.0, 2 - 2 * float(cos.min())))),
                "gallery": len(gallery),
            }
        out["search"] = self._search_agreement(rng)
        return out

    def _search_agreement(self, rng: np.random.Generator) -> dict:
        """Every backend that runs on this device against exact float64 search: the same top-1."""
        from facegen.engine.index import IndexShard, faiss_has_gpu

        vectors = _unit_rows(rng, self.plan.gallery, self.plan.embedding_dim)
        queries = _unit_rows(rng, 256, self.plan.embedding_dim)
        exact = queries.astype(np.float64) @ vectors.astype(np.float64).T
        want_rows, want_sims = exact.argmax(axis=1), exact.max(axis=1)
        backends = {"faiss": "cpu", "torch": str(self.device)}
        if self.device.type == "cuda" and faiss_has_gpu():
            backends["faiss-gpu"] = str(self.device)
        result = {}
        labels = np.zeros(len(vectors), dtype=object)
        for name, where in backends.items():
            shard = IndexShard.from_arrays(vectors, labels, labels, backend=name.split("-")[0], device=where)
            sims, rows = shard.max_similarity(queries)
            result[name] = {"device": where, "identical_top1": bool((rows == want_rows).all()),
                            "max_abs_diff": float(np.abs(sims - want_sims).max())}
        return result

    def generator(self, deadline: Deadline) -> dict:
        flops = self.generator_flops()
        rows, combos = [], [(d, p) for d in ["fp32", *reduced_dtypes(self.device)] for p in ("shared", "fused")]
        for i, (dtype, path) in enumerate(combos):
            share_end = time.perf_counter() + deadline.left() / (len(combos) - i)  # an equal share each
            for batch in self.plan.batches:
                if time.perf_counter() >= share_end:
                    rows.append({"dtype": dtype, "path": path, "batch": batch, "skipped": "time budget"})
                    continue
                z, c = self.latents(batch)
                rows.append(self._rate_row(partial(self.render, z, c, dtype, path), batch, flops,
                                           dtype=dtype, path=path))
        best = [r["images_per_s"] for r in rows if "images_per_s" in r]
        self.best_generator_rate = max(best) if best else None
        return {"resolution": self.plan.resolution, "params": sum(p.numel() for p in self.models()[0].parameters()),
                "flops_per_image": flops, "rows": rows}

    def embedder(self, deadline: Deadline) -> dict:
        flops = self.embedder_flops()
        rows, dtypes = [], ["fp32", *reduced_dtypes(self.device)]
        for i, dtype in enumerate(dtypes):
            share_end = time.perf_counter() + deadline.left() / (len(dtypes) - i)
            embedder = self.embedder_at(dtype)
            for batch in self.plan.batches:
                if time.perf_counter() >= share_end:
                    rows.append({"dtype": dtype, "batch": batch, "skipped": "time budget"})
                    continue
                images = torch.randint(0, 256, (batch, 3, self.plan.resolution, self.plan.resolution),
                                       dtype=torch.uint8, device=self.device)
                rows.append(self._rate_row(lambda e=embedder, x=images: e.embed(x), batch, flops, dtype=dtype))
        return {"model": f"iresnet{self.plan.embedder_depth}", "input_size": self.plan.embedder_input,
                "params": sum(p.numel() for p in self.models()[1].module.parameters()),
                "flops_per_image": flops, "rows": rows}

    def _rate_row(self, step: Callable[[], object], batch: int, flops: int, **labels) -> dict:
        row: dict[str, Any] = {**labels, "batch": batch}
        try:
            seconds = timed(step, self.device, self.plan.min_seconds)
        except OUT_OF_MEMORY:
            torch.cuda.empty_cache()
            return {**row, "skipped": "out of memory"}
        rate = batch / seconds
        return {**row, "images_per_s": rate, "ms_per_image": 1000 / rate,
                "roofline_share": share(rate, flops, self.peak, labels.get("dtype", "fp32"))}

    def evaluate(self, deadline: Deadline) -> dict:
        from facegen.engine.bundle import Bundle
        from facegen.engine.phases import conditions_for
        from facegen.engine.seeding import Stream, draw_keys
        from facegen.engine.spec import build_spec

        p = self.plan
        generator, embedder = self.models()
        rows = []
        with tempfile.TemporaryDirectory() as folder:
            index = _random_index(folder, p.evaluate_enrolled, embedder, self.device)
            flops = self.generator_flops() + self.embedder_flops() + 2 * p.embedding_dim * p.evaluate_enrolled
            for dtype in ["fp32", *reduced_dtypes(self.device)]:
                if deadline.expired():
                    rows.append({"dtype": dtype, "skipped": "time budget"})
                    continue
                # As a job runs it: reduced-precision generator and embedder, fp32 recheck near the threshold.
                spec = build_spec({"batch_size": p.evaluate_batch, "generator": {"path": "-", "dtype": dtype},
                                   "embedder": {"path": "-", "dtype": dtype}, "privacy": {"threshold": 0.5},
                                   "index": {"uri": "-"}, "output": {"uri": "-"}})
                bundle = Bundle(generator, embedder, index, self.device, spec)
                slots = np.arange(p.evaluate_candidates)
                conditions, keys = conditions_for(bundle, slots), draw_keys(0, Stream.LATENT, slots, 0)
                seconds = timed(lambda b=bundle, c=conditions, k=keys: b.evaluate(c, k), self.device,
                                p.min_seconds, max_iters=3)
                rate = p.evaluate_candidates / seconds
                rows.append({"dtype": dtype, "batch": p.evaluate_batch, "candidates_per_s": rate,
                             "roofline_share": share(rate, flops, self.peak, dtype)})
        return {"enrolled": p.evaluate_enrolled, "flops_per_candidate": flops, "rows": rows}

    def privacy(self, deadline: Deadline) -> dict:
        """µs per candidate of one batched exact query, each backend that runs on this device."""
        from facegen.engine.index import IndexShard, faiss_has_gpu

        p = self.plan
        on_gpu = self.device.type == "cuda"
        backends = (["torch"] + (["faiss"] if faiss_has_gpu() else [])) if on_gpu else ["faiss"]
        rng = np.random.default_rng(1)
        queries = _unit_rows(rng, p.privacy_queries, p.embedding_dim)
        rows = []
        for size in p.privacy_sizes:
            if deadline.expired():
                rows.append({"enrolled": size, "skipped": "time budget"})
                continue
            vectors = _unit_rows(rng, size, p.embedding_dim, device=self.device)
            labels = np.zeros(size, dtype=object)
            for backend in backends:
                if deadline.expired():
                    rows.append({"enrolled": size, "backend": backend, "skipped": "time budget"})
                    continue
                try:
                    shard = IndexShard.from_arrays(vectors, labels, labels, backend=backend,
                                                   device=str(self.device)).load()
                    seconds = timed(lambda s=shard: s.max_similarity(queries), self.device, p.min_seconds, 5)
                except (MemoryError, OUT_OF_MEMORY) as err:
                    rows.append({"enrolled": size, "backend": backend, "skipped": type(err).__name__})
                    continue
                per = seconds / len(queries)
                flops = 2 * p.embedding_dim * size
                rows.append({"enrolled": size, "backend": backend, "us_per_candidate": per * 1e6,
                             "roofline_share": share(1 / per, flops, self.peak, "fp32")})
                del shard
            del vectors, labels
            gc.collect()
        return {"dim": p.embedding_dim, "queries": p.privacy_queries, "rows": rows}

    def png(self, deadline: Deadline) -> dict:
        from concurrent.futures import ProcessPoolExecutor

        p = self.plan
        rng = np.random.default_rng(2)
        # A smooth image compresses like a face (random noise would not compress at all).
        yy, xx = np.mgrid[0 : p.resolution, 0 : p.resolution]
        base = (np.sin(xx / 7.0) * 60 + np.cos(yy / 11.0) * 60 + 128)[..., None]
        images = [np.clip(base + rng.normal(0, 8, (p.resolution, p.resolution, 3)), 0, 255).astype(np.uint8)
                  for _ in range(p.png_images)]
        start = time.perf_counter()
        sizes = [len(b) for b in map(_encode_pair, images)]
        one_core = len(images) / (time.perf_counter() - start)
        processes = p.png_processes or (os.cpu_count() or 1)
        all_cores = None
        if processes > 1 and not deadline.expired():
            with ProcessPoolExecutor(processes) as pool:
                list(pool.map(_encode_pair, images[:processes]))  # start the workers
                start = time.perf_counter()
                list(pool.map(_encode_pair, images * max(1, processes // 4), chunksize=4))
                all_cores = len(images) * max(1, processes // 4) / (time.perf_counter() - start)
        best = self.best_generator_rate
        return {"resolution": p.resolution, "images_per_s_per_core": one_core, "processes": processes,
                "images_per_s_all_cores": all_cores, "mean_bytes": float(np.mean(sizes)),
                "cores_to_match_generator": None if not best else best / one_core,
                "note": "VIS RGB + NIR gray pair per image, PNG compress_level 1 (the shard encoder's)"}

    def demo_spec(self, folder: str, *overrides: str):
        """The demo job (models, index and spec written under `folder`) on this device, local executor."""
        from facegen.engine.spec import build_spec
        from facegen.jobs.demo import prepare_demo

        spec = prepare_demo(Path(folder) / "demo", population=40 if self.quick else 400)
        settings = [f"run.device={self.device.type}", "run.executor=local"]
        if self.quick:
            settings += ["identities=2", "samples_per_identity=2", "batch_size=8"]
        return build_spec(json.loads(spec.model_dump_json()), settings + list(overrides))

    def end_to_end(self, deadline: Deadline) -> dict:
        from facegen.engine.job import load_bundle
        from facegen.engine.local import run_local

        with tempfile.TemporaryDirectory() as folder:
            spec = self.demo_spec(folder)
            flops = candidate_flops(load_bundle(spec))
            start = time.perf_counter()
            report = run_local(spec, progress=False)
            seconds = time.perf_counter() - start
        samples, attempts = report["samples"]["written"], report["samples"]["attempts"]
        candidates = attempts + (report["identities"]["proposed"] or 0)
        rate = candidates / seconds
        return {"job": f"demo (64² generator, r18-shaped embedder, {40 if self.quick else 400} enrolled)",
                "identities": spec.identities,
                "samples": samples, "seconds": round(seconds, 3), "samples_per_s": samples / seconds,
                "candidates_per_s": rate, "flops_per_candidate": flops,
                "roofline_share": share(rate, flops, self.peak, "fp32"),
                "stages": report["executor"]["stages"],
                "note": "includes model loading, selection, PNG encoding and writing"}

    def overlap(self, deadline: Deadline) -> dict:
        """Phase 3 with shard writing overlapped and inline, same job, same run; the shards must be
        identical byte for byte (the overlap changes when bytes are written, never which)."""
        from facegen.engine.local import run_local

        rows, shard_digests = [], {}
        if deadline.expired():
            return {"rows": [], "skipped": "time budget"}
        with tempfile.TemporaryDirectory() as folder:
            sizes = ["identities=3"] if self.quick else []
            base = self.demo_spec(folder, *sizes, f"output.samples_per_shard={self.plan.overlap_samples_per_shard}")
            for overlap in (False, True):  # both or neither: the pair is the measurement
                out = Path(folder) / f"overlap-{overlap}"
                spec = base.model_copy(update={
                    "output": base.output.model_copy(update={"uri": str(out)}),
                    "run": base.run.model_copy(update={"overlap": overlap})})
                report = run_local(spec, progress=False)
                stages = report["executor"]["stages"]
                rows.append({"overlap": overlap, "samples": report["samples"]["written"], **stages,
                             "samples_per_s": report["samples"]["written"] / max(stages["wall_s"], 1e-9)})
                shard_digests[overlap] = _folder_digests(out, ("shards", "manifest", "done"))
        result: dict[str, Any] = {"rows": rows, "note": "phase 3 only (expand, encode, write); wall_s is its time"}
        if len(shard_digests) == 2:
            result["identical_shards"] = shard_digests[False] == shard_digests[True]
            result["speedup"] = rows[0]["wall_s"] / max(rows[1]["wall_s"], 1e-9)
        return result

    def compile(self, deadline: Deadline) -> dict:
        """`Bundle.evaluate` with torch.compile'd networks (`run.compile`) against eager, same weights."""
        from facegen.engine.bundle import Bundle
        from facegen.engine.phases import conditions_for
        from facegen.engine.seeding import Stream, draw_keys
        from facegen.engine.spec import build_spec
        from facegen.engine.transfer import compile_networks

        p = self.plan
        generator, embedder = self.models()
        tree = {"batch_size": p.evaluate_batch, "generator": {"path": "-"}, "embedder": {"path": "-"},
                "privacy": {"threshold": 0.5}, "index": {"uri": "-"}, "output": {"uri": "-"}}
        with tempfile.TemporaryDirectory() as folder:
            index = _random_index(folder, p.evaluate_enrolled, embedder, self.device)
            eager = Bundle(generator, embedder, index, self.device, build_spec(tree))
            slots = np.arange(p.evaluate_candidates)
            conditions, keys = conditions_for(eager, slots), draw_keys(0, Stream.LATENT, slots, 0)
            eager_s = timed(lambda: eager.evaluate(conditions, keys), self.device, p.min_seconds, max_iters=3)
            reference = eager.evaluate(conditions, keys)
            # Copies: compiling is in place, and the other sections time the eager modules. --quick
            # traces with dynamo but skips inductor's C++ build (minutes on a small CPU; the inductor
            # path itself is tested on a tiny model, tests/engine/test_compile.py).
            compiled = Bundle(copy.deepcopy(generator), copy.deepcopy(embedder), index, self.device,
                              build_spec(tree))
            compile_networks(compiled.generator, compiled.embedder, backend=self.compile_backend)
            start = time.perf_counter()
            first = compiled.evaluate(conditions, keys)  # compiles (every batch shape seen here)
            sync(self.device)
            compile_s = time.perf_counter() - start
            row: dict[str, Any] = {"compile_s": compile_s, "eager_candidates_per_s": p.evaluate_candidates / eager_s}
            if deadline.expired():
                row["compiled_candidates_per_s"] = "skipped: time budget"
            else:
                seconds = timed(lambda: compiled.evaluate(conditions, keys), self.device, p.min_seconds, max_iters=3)
                row["compiled_candidates_per_s"] = p.evaluate_candidates / seconds
                row["speedup"] = eager_s / seconds
            levels = np.abs(first.vis.astype(np.int16) - reference.vis.astype(np.int16))
            row.update(max_embedding_diff=float((first.embedding - reference.embedding).abs().max()),
                       max_similarity_diff=float(np.abs(first.real_sim - reference.real_sim).max()),
                       uint8_changed_fraction=float((levels > 0).mean()), uint8_max_level_change=int(levels.max()))
        return {"backend": self.compile_backend, "batch": p.evaluate_batch, "candidates": p.evaluate_candidates,
                "enrolled": p.evaluate_enrolled, **row}

    def train(self, deadline: Deadline) -> dict:
        """`facegen bench train`'s in-process phase breakdown (its Ray Train worker scaling starts a
        cluster and does not fit the time box: `facegen bench train` runs it)."""
        from facegen.jobs.benchmarks.train import bench_args, run_train_bench

        # --quick: both regularisers every 4 steps, so one whole cycle is 4 steps rather than 16
        overrides = ["loss.d_reg_interval=4"] if self.quick else []
        args = bench_args(quick=self.quick, device=self.device.type, scaling=False, overrides=overrides)
        return run_train_bench(args)


def candidate_flops(bundle) -> int:
    """Generator + embedder FLOPs of one candidate of a loaded job bundle."""
    g, device = bundle.generator, bundle.device
    z = torch.zeros(1, g.z_dim, device=device)
    c = torch.zeros(1, g.c_dim, device=device) if g.c_dim else None
    size = g.img_resolution
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)
    with torch.inference_mode():
        return count_flops(lambda: g(z, c)) + count_flops(lambda: bundle.embedder.embed(image))


def _folder_digests(root: Path, folders: tuple[str, ...]) -> dict[str, str]:
    import hashlib

    return {f"{sub}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in folders for p in sorted((root / sub).iterdir())}


def _encode_pair(image: np.ndarray) -> bytes:
    from facegen.engine.dataset.codec import encode_image

    return encode_image(image) + encode_image(image[..., 0])


def _unit_rows(rng: np.random.Generator, count: int, dim: int, device: torch.device | None = None) -> np.ndarray:
    """Random unit float32 rows; drawn on a CUDA device when given (10⁷ rows in a second)."""
    if device is not None and device.type == "cuda":
        out = np.empty((count, dim), np.float32)
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(1 << 31)))
        for start in range(0, count, 1 << 20):
            block = torch.randn(min(1 << 20, count - start), dim, device=device, generator=gen)
            out[start : start + len(block)] = torch.nn.functional.normalize(block, dim=1).cpu().numpy()
        return out
    from facegen.jobs.benchmarks.filter import unit_vectors

    return unit_vectors(rng, count, dim)


def _random_index(folder: str, size: int, embedder, device: torch.device):
    from facegen.engine.index.build import build_index
    from facegen.engine.index.search import PrivacyIndex
    from facegen.engine.storage import Storage

    vectors = _unit_rows(np.random.default_rng(size), size, embedder.dim, device)
    names = [str(i) for i in range(size)]
    build_index(vectors, names, names, Storage(folder), embedder_fingerprint=embedder.fingerprint,
                preprocessing=embedder.preprocessing.to_dict())
    return PrivacyIndex.open(folder, device=device.type)
