"""The train-fr loop: a plain function of a `TrainContext`, run on every rank (Ray Train or in-process).

Each step: this rank's share of the global batch -> iResNet -> embeddings, the partial-FC margin loss
over the whole global batch (heads.py), backward, the backbone's gradients summed over ranks (the
loss already averages over the global batch), clipping, SGD. Every `log_steps` rank 0 writes a log
line and a stats.jsonl entry; every `checkpoint_steps` and at the end a checkpoint is reported.
The data is an endless stream of epochs of `FRDataset`, split across ranks and loader workers.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facegen.engine.frdata import FRDataset, fr_loader
from facegen.engine.frdata.images import FRTransform
from facegen.engine.frtrain.checkpoint import (
    BACKBONE_FILE,
    checkpoint_name,
    load_checkpoint,
    save_backbone,
    save_checkpoint,
)
from facegen.engine.frtrain.heads import PartialFCHead, class_range
from facegen.engine.frtrain.spec import FRTrainSpec
from facegen.engine.storage import Storage
from facegen.engine.training import distributed as dist
from facegen.engine.training.context import TrainContext
from facegen.engine.training.rundir import RunDir
from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, IResNetConfig

RESULT_FILE = "result.json"
PROBE_SAMPLES = 8


def open_dataset(spec: FRTrainSpec, rank: int, world_size: int) -> FRDataset:
    d = spec.data
    return FRDataset(d.uri, storage_options=d.storage_options, mode=d.mode, image_size=d.image_size, flip=d.flip,
                     seed=spec.seed, open_shards=d.open_shards, shuffle_buffer=d.shuffle_buffer, follow=d.follow,
                     poll_seconds=d.poll_seconds, follow_timeout=d.follow_timeout, rank=rank, world_size=world_size)


def expected_samples(ds: FRDataset) -> int:
    """Samples per epoch; following a job, what its spec will write (the same on every rank, whenever
    each one looks: counting what exists could differ between ranks while the job finishes)."""
    if not ds.follow:
        return ds.num_samples()
    from facegen.engine.spec import load_spec_yaml_text

    spec = load_spec_yaml_text(ds.catalog.storage.read_text("job.yaml"))
    return ds.num_classes * spec.samples_per_identity * (2 if ds.mode == "both" else 1)


def total_steps(spec: FRTrainSpec, ds: FRDataset) -> int:
    if spec.optim.steps is not None:
        return spec.optim.steps
    return max(1, math.ceil(spec.optim.epochs * expected_samples(ds) / spec.optim.batch_size))


def lr_at(spec: FRTrainSpec, step: int, total: int) -> float:
    """Linear warm-up, then insightface's polynomial decay (power 2) to 0 at the last step."""
    o = spec.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    return o.lr * (1 - (step - o.warmup_steps) / max(1, total - o.warmup_steps)) ** 2


@dataclass
class Position:
    epoch: int = 0
    samples_in_epoch: int = 0


def batches(ds: FRDataset, per_rank: int, workers: int, position: Position,
            pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-size batches of this rank's stream, epoch after epoch (epochs run into each other)."""
    images, labels, held = [], [], 0
    for epoch in itertools.count(position.epoch):
        ds.set_epoch(epoch)
        position.epoch, position.samples_in_epoch = epoch, 0
        for x, y in fr_loader(ds, batch_size=per_rank, num_workers=workers, pin_memory=pin_memory):
            position.samples_in_epoch += len(y)
            images.append(x)
            labels.append(y)
            held += len(y)
            while held >= per_rank:
                x_all, y_all = torch.cat(images), torch.cat(labels)
                yield x_all[:per_rank], y_all[:per_rank]
                images, labels, held = [x_all[per_rank:]], [y_all[per_rank:]], held - per_rank
        if position.samples_in_epoch == 0:
            raise UserError(f"{ds.catalog.storage.uri}: this worker's share of the dataset is empty "
                            "(fewer samples than ranks x loader workers)")


class FRTrainer:
    def __init__(self, spec: FRTrainSpec, ctx: TrainContext, run_uri: str) -> None:
        self.spec, self.ctx = spec, ctx
        self.run_storage = Storage(run_uri, spec.output.storage_options)
        self.run_dir = RunDir(self.run_storage, echo=ctx.is_main) if ctx.is_main else None
        self.data = open_dataset(spec, ctx.rank, ctx.world_size)
        if self.run_dir is not None and spec.data.follow and not self.data.catalog.finished():
            self.log(f"Following {spec.data.uri} while it is being generated")
            self.run_dir.flush()
        self.num_classes = self.data.num_classes
        self.total = total_steps(spec, self.data)
        torch.manual_seed(spec.seed)  # the same initial backbone on every rank
        m = spec.model
        config = IResNetConfig(depth=m.depth, embedding_dim=m.embedding_dim, input_size=spec.data.image_size,
                               base_width=m.base_width, dropout=m.dropout, fp16=m.fp16)
        self.backbone = IResNet(config).to(ctx.device)
        h = spec.head
        self.head = PartialFCHead(self.num_classes, m.embedding_dim, margin=h.margin, m=h.margin_value,
                                  scale=h.scale, sample_rate=h.sample_rate, rank=ctx.rank,
                                  world_size=ctx.world_size, seed=spec.seed).to(ctx.device)
        self.params = [p for p in self.backbone.parameters() if p.requires_grad]
        o = spec.optim
        self.opt_backbone = torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.opt_head = torch.optim.SGD(self.head.parameters(), lr=o.lr, momentum=o.momentum,
                                        weight_decay=o.weight_decay)
        self.step, self.position, self.restored_from = 0, Position(), None
        self._generation_done, self.generating_at_batch = not spec.data.follow, []

    def log(self, line: str) -> None:
        if self.run_dir is not None:
            self.run_dir.log(line)

    # -- checkpoints ----------------------------------------------------------------------------
    def head_state(self) -> dict[str, torch.Tensor] | None:
        """Every rank's centres and momentum, concatenated in class order (on rank 0; None elsewhere)."""
        momentum = self.opt_head.state.get(self.head.weight, {}).get("momentum_buffer")
        mine = (self.head.weight.detach().cpu(), None if momentum is None else momentum.detach().cpu())
        # to rank 0 only: an all-gather would put every centre in every worker's memory
        if dist.active(self.ctx.world_size):
            shards = [None] * self.ctx.world_size if self.ctx.is_main else None
            torch.distributed.gather_object(mine, shards, dst=0)
        else:
            shards = [mine]
        if not self.ctx.is_main:
            return None
        weights = torch.cat([w for w, _ in shards])
        state = {"weight": weights}
        if all(mo is not None for _, mo in shards):
            state["momentum"] = torch.cat([mo for _, mo in shards])
        return state

    def save(self, final: bool) -> None:
        head = self.head_state()
        metrics = {"step": self.step, "epoch": self.position.epoch, "final": final}
        if not self.ctx.is_main:
            self.ctx.report(metrics, None)
            return
        state = {"step": self.step, "epoch": self.position.epoch + 1, "world_size": self.ctx.world_size,
                 "num_classes": self.num_classes, "optimizer": self.opt_backbone.state_dict(),
                 "spec": json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)}
        with tempfile.TemporaryDirectory(prefix="facegen-fr-") as tmp:
            folder = save_checkpoint(f"{tmp}/{checkpoint_name(self.step)}", self.backbone, head, state)
            self.log(f"Checkpoint {folder.name} at step {self.step}")
            self.run_dir.flush()
            self.ctx.report(metrics, str(folder))

    def restore(self, folder: str, source: str) -> None:
        backbone, head, state = load_checkpoint(folder)
        if int(state.get("num_classes", -1)) != self.num_classes:
            raise UserError(f"{source}: checkpoint has {state.get('num_classes')} classes, "
                            f"the dataset {self.num_classes}")
        self.backbone.load_state_dict(backbone, strict=True)
        start, count = class_range(self.num_classes, self.ctx.rank, self.ctx.world_size)
        with torch.no_grad():
            self.head.weight.copy_(head["weight"][start:start + count])
        if "momentum" in head:
            self.opt_head.state[self.head.weight]["momentum_buffer"] = (
                head["momentum"][start:start + count].clone().to(self.ctx.device))
        self.opt_backbone.load_state_dict(state["optimizer"])
        self.step, self.position = int(state["step"]), Position(epoch=int(state["epoch"]))
        self.restored_from = source

    # -- training -------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Sum over ranks: each rank's gradient covers its own samples of the global-batch mean loss."""
        if not dist.active(self.ctx.world_size):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        for p, g in zip(self.params, flat.split([q.numel() for q in self.params])):
            p.grad = g.view_as(p)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
        for opt in (self.opt_backbone, self.opt_head):
            for group in opt.param_groups:
                group["lr"] = lr
        loss = self.head(self.backbone(images), labels)
        self.opt_backbone.zero_grad(set_to_none=True)
        self.opt_head.zero_grad(set_to_none=True)
        loss.backward()
        self.reduce_gradients()
        if self.spec.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.optim.clip_grad_norm)
        self.opt_backbone.step()
        self.opt_head.step()
        return float(loss.detach())

    def run(self) -> dict[str, Any]:
        spec, ctx = self.spec, self.ctx
        if ctx.latest_checkpoint:
            self.restore(ctx.latest_checkpoint, "restart checkpoint")
            self.log(f"Restarted from checkpoint {ctx.latest_checkpoint.rstrip('/').rsplit('/', 1)[-1]} "
                     f"at step {self.step}")
        elif spec.resume:
            from facegen.engine.frtrain.checkpoint import latest_checkpoint

            self.restore(latest_checkpoint(spec.resume, spec.output.storage_options), spec.resume)
            self.log(f"Resumed from {spec.resume} at step {self.step}")
        else:
            self.log(f"Dataset {spec.data.uri}: {self.num_classes} identities; {self.total} steps of "
                     f"{spec.optim.batch_size} on {ctx.world_size} worker(s)")
            if self.run_dir is not None:
                self.run_dir.write_options({"spec": spec.model_dump(mode="json"), "num_classes": self.num_classes,
                                            "total_steps": self.total, "world_size": ctx.world_size})
        self.backbone.train()
        per_rank = spec.optim.batch_size // ctx.world_size
        stream = batches(self.data, per_rank, spec.data.loader_workers, self.position, ctx.device.type == "cuda")
        losses, started = [], time.monotonic()
        while self.step < self.total:
            images, labels = next(stream)
            self.generating_at_batch.append(self.still_generating())  # per step of this log interval
            if ctx.step_hook is not None:
                ctx.step_hook(ctx, self.step)
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            losses.append(self.train_step(images, labels, lr_at(spec, self.step, self.total)))
            self.step += 1
            if self.step % spec.schedule.log_steps == 0 or self.step == self.total:
                self.write_stats(losses, started)
                losses, started = [], time.monotonic()
            if self.step % spec.schedule.checkpoint_steps == 0 and self.step < self.total:
                self.save(final=False)
        self.save(final=True)
        return self.finish()

    def still_generating(self) -> bool:
        """Following: the job had not written its report when this batch arrived (once done, stays done)."""
        if not self._generation_done:
            self._generation_done = self.data.catalog.finished()
        return not self._generation_done

    def write_stats(self, losses: list[float], started: float) -> None:
        if self.run_dir is None:
            return
        seconds = max(time.monotonic() - started, 1e-9)
        catalog = self.data.catalog
        entry = {"step": self.step, "epoch": self.position.epoch, "loss": float(np.mean(losses)),
                 "lr": lr_at(self.spec, self.step - 1, self.total),
                 "images_per_s": len(losses) * self.spec.optim.batch_size / seconds,
                 "shards_complete": catalog.shards_complete(),
                 "read_while_generating": sum(self.generating_at_batch)}
        self.generating_at_batch = []
        self.log(f"step {self.step}/{self.total} epoch {entry['epoch']} loss {entry['loss']:.4f} "
                 f"lr {entry['lr']:.5f} {entry['images_per_s']:.1f} img/s")
        self.run_dir.append_stats(entry)
        self.run_dir.flush()

    def finish(self) -> dict[str, Any]:
        """Rank 0: the backbone as `backbone.pth` beside `result.json` (with probe embeddings)."""
        if not self.ctx.is_main:
            return {"step": self.step}
        with tempfile.TemporaryDirectory(prefix="facegen-fr-") as tmp:
            save_backbone(self.backbone, f"{tmp}/{BACKBONE_FILE}")
            with open(f"{tmp}/{BACKBONE_FILE}", "rb") as handle:
                self.run_storage.write_bytes(BACKBONE_FILE, handle.read())
        result = {"step": self.step, "num_classes": self.num_classes, "backbone": self.run_storage.url(BACKBONE_FILE),
                  "probe": self.probe_embeddings()}
        self.run_storage.write_json(RESULT_FILE, result)
        self.log(f"Saved {self.run_storage.url(BACKBONE_FILE)}")
        self.run_dir.flush()
        return result

    def probe_embeddings(self) -> dict[str, Any]:
        """The trained model's embeddings of the first samples of the first shard (key order; of a VIS/NIR
        folder, its first files), so anyone can check that the saved backbone reproduces them."""
        keys, pixels, source = self.data.catalog.probe_images(PROBE_SAMPLES)
        transform = FRTransform(size=self.spec.data.image_size)
        images = torch.stack([transform.to_tensor(transform.pixels(p), False) for p in pixels])
        self.backbone.eval()
        with torch.no_grad():
            embeddings = F.normalize(self.backbone(images.to(self.ctx.device)).float(), dim=1).cpu()
        return {"keys": keys, "shard": source, "embeddings": embeddings.tolist()}


def train_fr(spec: FRTrainSpec, ctx: TrainContext, run_uri: str) -> dict[str, Any]:
    return FRTrainer(spec, ctx, run_uri).run()
