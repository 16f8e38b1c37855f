"""Tiny in-process models and a job around them, shared by the engine tests."""

from __future__ import annotations

import numpy as np
import torch

from facegen.engine.bundle import Bundle
from facegen.engine.index.build import build_index
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.seeding import Stream, draw_keys
from facegen.engine.spec import build_spec
from facegen.engine.storage import Storage
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.iresnet import IResNet, IResNetConfig

DIM = 32

# Thresholds tuned to untrained tiny networks, whose embeddings all lie in a narrow cone.
TINY_THRESHOLDS = {
    "privacy.threshold": 0.95,
    "privacy.separability_threshold": 0.97,
    "filter.same_threshold": 0.7,
    "filter.diversity_threshold": 0.985,
}


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    config = GeneratorConfig(z_dim=32, c_dim=DIM, w_dim=32, img_resolution=32, channel_base=256, channel_max=32,
                             mapping_layers=2, num_fp16_res=0)
    return Generator(config).eval().requires_grad_(False)


def tiny_embedder(seed: int = 1) -> TorchEmbedder:
    torch.manual_seed(seed)
    module = IResNet(IResNetConfig(depth=18, embedding_dim=DIM, input_size=32, base_width=8))
    return TorchEmbedder(module, Preprocessing(input_size=32))


def tiny_spec(out: str, **overrides):
    tree = {
        "identities": 6,
        "samples_per_identity": 3,
        "generator": {"path": "in-process"},
        "embedder": {"path": "in-process"},
        "index": {"uri": "in-process"},
        "output": {"uri": out, "samples_per_shard": 6},
        "filter": {"max_attempts": 40},
    }
    settings = {**TINY_THRESHOLDS, **overrides}
    return build_spec(tree, [f"{k}={v}" for k, v in settings.items()])


def real_population(generator: Generator, embedder: TorchEmbedder, count: int, seed: int = 999) -> np.ndarray:
    """Stand-ins for enrolled real people: faces of the same generator from an unrelated seed."""
    from facegen.engine.seeding import normal, random_directions

    slots = np.arange(count)
    c = torch.from_numpy(random_directions(draw_keys(seed, Stream.CONDITION, slots), DIM, 4.0))
    z = torch.from_numpy(normal(draw_keys(seed, Stream.LATENT, slots, 0), generator.z_dim))
    from facegen.models.generator import images_to_uint8

    with torch.no_grad():
        vis, _ = generator(z, c, truncation_psi=0.7)
    return embedder.embed(images_to_uint8(vis)).numpy()


def make_index(folder: str, embedder: TorchEmbedder, embeddings: np.ndarray) -> PrivacyIndex:
    storage = Storage(folder)
    identities = [str(i) for i in range(len(embeddings))]
    build_index(embeddings, identities, [f"{i}_0.png" for i in identities], storage,
                embedder_fingerprint=embedder.fingerprint, preprocessing=embedder.preprocessing.to_dict(),
                shard_size=max(1, len(embeddings) // 2))
    return PrivacyIndex.open(storage, backend="faiss")


def tiny_bundle(spec, index: PrivacyIndex, generator=None, embedder=None) -> Bundle:
    return Bundle(generator or tiny_generator(), embedder or tiny_embedder(), index, torch.device("cpu"), spec)


def write_tiny_job(folder, out: str, **overrides) -> str:
    """Native model files, an enrolled index and a job YAML under `folder`; returns the YAML path."""
    import yaml

    from facegen.models.checkpoint import save_native

    folder = str(folder)
    generator, embedder = tiny_generator(), tiny_embedder()
    save_native(generator, f"{folder}/G.safetensors")
    save_native(embedder.module, f"{folder}/E.safetensors")
    make_index(f"{folder}/index", embedder, real_population(generator, embedder, 40))
    tree = {
        "identities": 4,
        "samples_per_identity": 2,
        "batch_size": 8,
        "generator": {"path": f"{folder}/G.safetensors"},
        "embedder": {"path": f"{folder}/E.safetensors"},
        "index": {"uri": f"{folder}/index"},
        "output": {"uri": out, "samples_per_shard": 2},
        "privacy": {"threshold": 0.95, "separability_threshold": 0.97},
        "filter": {"same_threshold": 0.6, "diversity_threshold": 0.985, "max_attempts": 100},
        # The Ray executor has its own tests (tests/cluster). A short lease: a resume right after a
        # `kill -9` waits for the killed run's lease to expire (engine.lease).
        "run": {"executor": "local", "lease_ttl": 10},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            tree.setdefault(section, {})[leaf] = value
        else:
            tree[key] = value
    path = f"{folder}/job.yaml"
    with open(path, "w") as handle:
        yaml.safe_dump(tree, handle)
    return path
