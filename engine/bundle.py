"""The loaded models of a job and the one batched candidate computation every phase uses.

A *candidate* is one (condition, latent key) pair: render it with G, convert to uint8 exactly as the
saved image will be, embed it, and ask the privacy index for its most similar enrolled image. The
embedding is computed from the uint8 image, so the certified similarity is the one an auditor gets
from the PNG on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from facegen.engine.dataset.codec import round_trip
from facegen.engine.index.protocol import Index
from facegen.engine.index.search import reduce_max
from facegen.engine.precision import Precision, recheck, reduced_embedder
from facegen.engine.quality import Gate, no_gate
from facegen.engine.repair import Repair, SwapTargets
from facegen.engine.seeding import Stream, draw_keys, normal
from facegen.engine.spec import JobSpec
from facegen.engine.transfer import HostCopy, compile_networks
from facegen.models.embedder import FaceEmbedder
from facegen.models.errors import UserError
from facegen.models.generator import images_to_uint8
from facegen.models.rendering import ImageGenerator, open_generator

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Candidates:
    """A batch of rendered and embedded candidates; images on the CPU, ready to encode."""

    vis: np.ndarray  # uint8 [N, R, R, 3]
    nir: np.ndarray | None  # uint8 [N, R, R]
    embedding: torch.Tensor  # float32 [N, dim], L2-normalised, on the bundle's device
    real_sim: np.ndarray  # float32 [N]: max cosine to any enrolled image (VIS, and NIR if checked)
    real_row: np.ndarray  # int64 [N]: the enrolled row that achieved it
    # bool [N]: `embedding` is the fp32 embedder's (always, unless the embedder runs in reduced
    # precision and the candidate was not rechecked); comparisons near a threshold need it exact.
    exact: np.ndarray | None = None

    def put(self, rows: np.ndarray, other: Candidates) -> None:
        """Replace the given rows by `other`'s (in order): a repaired candidate takes a rejected one's place."""
        self.vis[rows] = other.vis
        if self.nir is not None:
            self.nir[rows] = other.nir
        self.embedding[torch.from_numpy(rows).to(self.embedding.device)] = other.embedding
        self.real_sim[rows] = other.real_sim
        self.real_row[rows] = other.real_row
        self.exact[rows] = other.exact


@dataclass
class Bundle:
    """The loaded models of a job. `generator` is the loaded module; `renderer` is its family's
    `ImageGenerator` configured by the spec's generator settings (built here, so every caller
    constructing a Bundle gets the same sampling)."""

    generator: torch.nn.Module
    embedder: FaceEmbedder
    index: Index
    device: torch.device
    spec: JobSpec
    gate: Gate = field(default=no_gate)
    renderer: ImageGenerator = field(init=False, repr=False)
    repair: Repair | None = field(init=False, repr=False)  # privacy.repair, loaded (engine/repair.py)

    def __post_init__(self) -> None:
        self.renderer = open_generator(self.generator, generator_settings(self.spec))
        repair = self.spec.privacy.repair
        self.repair = None if repair is None else Repair.open(repair, self.renderer)
        if self.spec.run.compile:
            compile_networks(self.generator, self.embedder)

    @property
    def c_dim(self) -> int:
        return self.renderer.c_dim

    def render(
        self, conditions: np.ndarray, latent_keys: np.ndarray, targets: SwapTargets | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 NCHW images (VIS, NIR) for one batch; the per-sample draws come from the keys. With
        `targets`, rows at a repair level >= 0 get their repair target's identity units (engine/repair.py)."""
        renderer = self.renderer
        z = torch.from_numpy(normal(latent_keys, renderer.z_dim)).to(self.device)
        c = torch.from_numpy(conditions).to(self.device) if renderer.c_dim else None
        noise = self._noise(latent_keys)
        dtype = _DTYPES[self.spec.generator.dtype]
        # fp16 only on CUDA; bf16 autocast also runs on CPUs (the reduced-precision path's CPU tests)
        autocast = dtype != torch.float32 and (self.device.type == "cuda" or dtype == torch.bfloat16)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=autocast):
            if targets is not None and targets.any:
                vis, nir = self.repair.render(renderer, z, c, noise, targets, self.spec.seed, self.spec.condition.norm)
            else:
                vis, nir = renderer.render(z, c, noise)
        return images_to_uint8(vis), None if nir is None else images_to_uint8(nir)

    def _noise(self, latent_keys: np.ndarray) -> dict[str, torch.Tensor] | None:
        """The renderer's per-sample noise inputs, each drawn from the sample's own key, so a sample's
        noise never depends on the batch it is computed in; None when the renderer takes none."""
        noise = {}
        for layer_number, (layer, (h, w)) in enumerate(self.renderer.noise_shapes().items()):
            # The latent key already encodes (job seed, slot, attempt); the layer number separates layers.
            keys = draw_keys(0, Stream.NOISE, latent_keys, layer_number)
            values = normal(keys, h * w).reshape(len(latent_keys), 1, h, w)
            noise[layer] = torch.from_numpy(values).to(self.device)
        return noise or None

    def evaluate(self, conditions: np.ndarray, latent_keys: np.ndarray,
                 targets: SwapTargets | None = None, *, exact: bool = False) -> Candidates:
        """Render, embed and privacy-query candidates in batches of `batch_size` (`targets`: see `render`).
        `exact`: embed in fp32 whatever `embedder.dtype` says (identity anchors, which everything is
        compared with)."""
        parts = []
        step = self.spec.batch_size
        for start in range(0, len(latent_keys), step):
            rows = slice(start, start + step)
            parts.append(self._evaluate_batch(conditions[rows], latent_keys[rows],
                                              None if targets is None else targets.take(rows), exact))
        return _concat(parts)

    def _evaluate_batch(self, conditions: np.ndarray, latent_keys: np.ndarray,
                        targets: SwapTargets | None, exact: bool = False) -> Candidates:
        vis, nir = self.render(conditions, latent_keys, targets)
        # The images travel to the host while the embedder runs (pinned, non-blocking on CUDA).
        vis_host = HostCopy(vis.permute(0, 2, 3, 1))
        nir_host = None if nir is None else HostCopy(nir[:, 0])
        output, seen = self.spec.output, vis
        if output.image_format != "png":
            # Certify the pixels a reader will decode, not the ones before lossy compression; the shard
            # encodes `vis` with the same deterministic encoder, so it decodes to exactly `seen`.
            seen = lossy_round_trip(vis, output.image_format, output.jpeg_quality)
        embedding, sims, rows, is_exact = self._embed_and_query(seen, exact)
        if self.spec.privacy.check_nir and nir is not None:
            # The closer of the two to anyone enrolled; a NaN answer for the NIR twin stays NaN, so the
            # candidate is refused as invalid rather than judged on its VIS image alone.
            _, nir_sims, nir_rows, _ = self._embed_and_query(nir, exact)
            sims, rows = reduce_max([(sims, rows), (nir_sims, nir_rows)])
        # NaN embeddings must never pass the filter: make them maximally similar.
        invalid = ~torch.isfinite(embedding).all(dim=1).cpu().numpy()
        sims[invalid] = np.inf
        return Candidates(
            vis=vis_host.numpy(),
            nir=None if nir_host is None else nir_host.numpy(),
            embedding=embedding,
            real_sim=sims,
            real_row=rows,
            exact=is_exact,
        )

    @property
    def precision(self) -> Precision:
        return Precision.of(self.spec.embedder.dtype, self.spec.privacy.recheck_margin)

    def _embed_and_query(self, images: torch.Tensor, exact: bool = False
                         ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Embedding, max similarity and row of uint8 images, and which embeddings are fp32; with a
        reduced-precision embedder, the candidates near the privacy threshold are decided on their fp32
        embedding (engine/precision.py)."""
        precision = Precision() if exact else self.precision
        embedder = reduced_embedder(self.embedder, precision.dtype)
        embedding = embedder.embed(images).to(self.device, torch.float32)
        sims, rows = self.index.max_similarity(embedding)
        sims, rows = np.asarray(sims, np.float32), np.asarray(rows, np.int64)
        rechecked = np.full(len(sims), not precision.reduced)
        if precision.reduced:
            sims, rows, embedding, rechecked = recheck(sims, rows, embedding, images, self.embedder.embed,
                                                       self.index.max_similarity, self.spec.privacy.threshold,
                                                       precision.margin)
        return embedding, sims, rows, rechecked

    def embed_exact(self, vis: np.ndarray) -> torch.Tensor:
        """fp32 embeddings (float32 [N, dim] on the device) of uint8 NHWC images as `evaluate` saw them
        (after the lossy round trip when the output format is lossy): the recheck of a reduced-precision
        candidate near the same-identity, separability or diversity threshold."""
        images = torch.from_numpy(np.ascontiguousarray(vis)).permute(0, 3, 1, 2).to(self.device)
        output = self.spec.output
        if output.image_format != "png":
            images = lossy_round_trip(images, output.image_format, output.jpeg_quality)
        return self.embedder.embed(images).to(self.device, torch.float32)


def lossy_round_trip(images: torch.Tensor, image_format: str, quality: int) -> torch.Tensor:
    """uint8 NCHW RGB -> the same images after encoding as written and decoding again.

    The encoder is deterministic, so the shard later holds exactly these pixels."""
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    decoded = [round_trip(a, image_format, quality) for a in arrays]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(images.device)


def _concat(parts: list[Candidates]) -> Candidates:
    first = parts[0]
    return Candidates(
        vis=np.concatenate([p.vis for p in parts]),
        nir=None if first.nir is None else np.concatenate([p.nir for p in parts]),
        embedding=torch.cat([p.embedding for p in parts]),
        real_sim=np.concatenate([p.real_sim for p in parts]),
        real_row=np.concatenate([p.real_row for p in parts]),
        exact=np.concatenate([p.exact for p in parts]),
    )


def generator_settings(spec: JobSpec) -> dict:
    """The job's settings for the generator family (how it samples); the path and the autocast dtype
    are the engine's."""
    return spec.generator.model_dump(exclude={"path", "dtype"})


def check_generator(generator: ImageGenerator, embedder: FaceEmbedder) -> None:
    """The generator's identity conditions must be this embedder's features."""
    if generator.c_dim and generator.c_dim != embedder.dim:
        raise UserError(
            f"generator c_dim {generator.c_dim} != embedder width {embedder.dim}: the generator is "
            "conditioned on identity features of another recognition model"
        )


def check_compatible(generator: ImageGenerator, embedder: FaceEmbedder, index: Index) -> None:
    """Refuse, before any work, model combinations that cannot produce a certified dataset."""
    check_generator(generator, embedder)
    index.check_compatible(embedder)
