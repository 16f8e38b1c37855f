"""Ranking swap units of W+ or StyleSpace by how much identity (and how little appearance) they carry.

For each unit u (one channel, a group of channels or a whole layer of a space) and each of M seeded
source/target face pairs, the source code gets u's coordinates from the target, is rendered and
compared with the source image (`metric`). The unit's ratio is mean identity change over mean
appearance change (+ epsilon); its score ranks units within the metric's appearance cap first
(`Metric.score`). StyleID publishes such ranks but not the code that computes them.

Work is cut into fixed tasks — (space, unit width, a block of `pairs_per_task` pairs) — and every
task renders its (pair, unit) swaps in batches of `batch_size`. A task's numbers depend only on the
task, never on who runs it, so the local loop and the Ray actors (cluster/disentangle.py) produce
identical tables; the driver averages the per-pair values in pair order, in float64.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.anonymise.metric import Metric, identity_change
from facegen.engine.seeding import Stream
from facegen.models.embedder import FaceEmbedder
from facegen.models.errors import UserError
from facegen.models.latent_space import SPACES
from facegen.models.rendering import LatentSpaces

LAYER = 0  # unit width meaning "the whole layer"


@dataclass(frozen=True)
class RankJob:
    """Everything that decides a rank table except the models."""

    spaces: tuple[str, ...] = ("wplus",)
    widths: tuple[int, ...] = (1,)  # channels per unit; 0 = whole layer
    pairs: int = 32
    seed: int = 0
    truncation_psi: float = 0.7
    batch_size: int = 64
    pairs_per_task: int = 8
    metric: Metric = field(default_factory=Metric)

    def __post_init__(self) -> None:
        bad = [s for s in self.spaces if s not in SPACES]
        if bad or not self.spaces:
            raise UserError(f"disentangle: spaces must be among {SPACES}, got {list(self.spaces)}")
        if not self.widths or any(w < 0 for w in self.widths):
            raise UserError(f"disentangle: unit widths must be >= 1 (or 0 for whole layers), got {list(self.widths)}")
        for name in ("pairs", "batch_size", "pairs_per_task"):
            if getattr(self, name) < 1:
                raise UserError(f"disentangle: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.truncation_psi <= 1:
            raise UserError(f"disentangle: truncation_psi must be in (0, 1], got {self.truncation_psi}")
        if self.metric.lowpass_size < 1 or self.metric.epsilon <= 0:
            raise UserError("disentangle: lowpass_size must be >= 1 and epsilon > 0")
        if not 0 < self.metric.appearance_cap <= 1:
            raise UserError(f"disentangle: appearance_cap must be in (0, 1], got {self.metric.appearance_cap}")

    def tasks(self) -> list[Task]:
        starts = range(0, self.pairs, self.pairs_per_task)
        return [Task(space, width, start, min(start + self.pairs_per_task, self.pairs))
                for space in self.spaces for width in self.widths for start in starts]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    space: str
    width: int
    start: int  # first pair
    stop: int


def units_of(space: LatentSpaces, name: str, width: int) -> np.ndarray:
    return space.layout(name).units(None if width == LAYER else width)


class Scorer:
    """Runs rank tasks on one (generator, embedder) pair; a Ray actor wraps one of these."""

    def __init__(self, space: LatentSpaces, embedder: FaceEmbedder, job: RankJob) -> None:
        self.space, self.embedder, self.job = space, embedder, job

    def pair_ws(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = np.arange(start, stop)
        job = self.job
        return (face_ws(self.space, job.seed, Stream.SWAP_SOURCE, slots, truncation_psi=job.truncation_psi),
                face_ws(self.space, job.seed, Stream.SWAP_TARGET, slots, truncation_psi=job.truncation_psi))

    @torch.no_grad()
    def run(self, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """(identity change, appearance change), float32 [pairs of the task, units]."""
        space, metric, batch = self.space, self.job.metric, self.job.batch_size
        source_ws, target_ws = self.pair_ws(task.start, task.stop)
        source = space.encode(task.space, source_ws)
        target = space.encode(task.space, target_ws)
        masks = space.layout(task.space).unit_masks(units_of(space, task.space, task.width))
        source_emb, source_low = [], []
        for part in source.split(batch):
            vis, _ = space.render_codes(task.space, part)
            source_emb.append(self.embedder.embed(vis).cpu())
            source_low.append(metric.lowpass(vis))
        source_emb, source_low = torch.cat(source_emb), torch.cat(source_low)
        num_pairs, num_units = len(source), len(masks)
        flat = torch.arange(num_pairs * num_units)  # item = pair * num_units + unit
        ids, looks = [], []
        for items in flat.split(batch):
            pair, unit = items // num_units, items % num_units
            codes = torch.where(masks[unit], target[pair], source[pair])
            vis, _ = space.render_codes(task.space, codes)
            ids.append(identity_change(source_emb[pair], self.embedder.embed(vis).cpu()))
            looks.append(metric.appearance_change(source_low[pair], vis))
        shape = (num_pairs, num_units)
        return torch.cat(ids).reshape(shape).numpy(), torch.cat(looks).reshape(shape).numpy()


RunTasks = Callable[[Sequence[Task]], list[tuple[np.ndarray, np.ndarray]]]


def run_locally(scorer: Scorer, progress: Callable[[int, int], None] | None = None) -> RunTasks:
    def run(tasks: Sequence[Task]) -> list[tuple[np.ndarray, np.ndarray]]:
        if progress:
            progress(0, len(tasks))  # open the bar now, so its clock covers the first task
        out = []
        for i, task in enumerate(tasks):
            out.append(scorer.run(task))
            if progress:
                progress(i + 1, len(tasks))
        return out
    return run


def rank(space: LatentSpaces, embedder: FaceEmbedder, job: RankJob, run_tasks: RunTasks | None = None
         ) -> pa.Table:
    """The rank table of every (space, unit width) of the job; `run_tasks` defaults to this process."""
    tasks = job.tasks()
    results = (run_tasks or run_locally(Scorer(space, embedder, job)))(tasks)
    tables = []
    for space_name in job.spaces:
        for width in job.widths:
            parts = [r for t, r in zip(tasks, results) if (t.space, t.width) == (space_name, width)]
            ids = np.concatenate([p[0] for p in parts]).astype(np.float64)
            looks = np.concatenate([p[1] for p in parts]).astype(np.float64)
            ids, looks = ids.mean(axis=0), looks.mean(axis=0)
            tables.append(_table(space, space_name, width, ids, looks, job.metric.score(ids, looks), job.metric))
    return _with_metadata(pa.concat_tables(tables), space, embedder, job)


def _table(space: LatentSpaces, name: str, width: int, ids: np.ndarray, looks: np.ndarray, score: np.ndarray,
           metric: Metric | None = None) -> pa.Table:
    units = units_of(space, name, width)
    layout = space.layout(name)
    return pa.table({
        "space": pa.array([name] * len(units), pa.string()),
        "unit_width": pa.array([width] * len(units), pa.int64()),
        "layer": pa.array(units[:, 0]),
        "layer_name": pa.array([layout.names[i] for i in units[:, 0]], pa.string()),
        "start": pa.array(units[:, 1]),
        "width": pa.array(units[:, 2]),
        "identity_change": pa.array(ids),
        "appearance_change": pa.array(looks),
        "ratio": pa.array(metric.ratio(ids, looks) if metric is not None else np.full(len(units), np.nan)),
        "score": pa.array(score),
        "rank": pa.array(_ranks_of(score)),
    })


def _with_metadata(table: pa.Table, space: LatentSpaces, embedder: FaceEmbedder, job: RankJob) -> pa.Table:
    meta = {"job": job.to_dict(), "embedder_fingerprint": embedder.fingerprint,
            "generator": {"num_ws": space.num_ws, "w_dim": space.w_dim, "resolution": space.resolution,
                          "style_layers": list(space.layout("style").names)}}
    return table.replace_schema_metadata({"facegen.disentangle": json.dumps(meta, sort_keys=True)})


def ranks_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_ranks(data: bytes, where: str = "ranks") -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{where}: not a parquet rank table ({err})") from None
    missing = {"space", "unit_width", "layer", "start", "width", "score", "rank"} - set(table.column_names)
    if missing:
        raise UserError(f"{where}: not a facegen rank table (missing columns {sorted(missing)})")
    return table


def select(table: pa.Table, space: str, width: int, where: str = "ranks") -> pa.Table:
    """The rows of one (space, unit width), sorted by rank (best first)."""
    spaces, widths = table.column("space").to_numpy(zero_copy_only=False), table.column("unit_width").to_numpy()
    keep = np.flatnonzero((spaces == space) & (widths == width))
    if not len(keep):
        have = sorted({(str(s), int(w)) for s, w in zip(spaces, widths)})
        raise UserError(f"{where}: no ranks for space {space!r} with unit width {width}; it has {have}")
    rows = table.take(pa.array(keep))
    return rows.take(pa.array(np.argsort(rows.column("rank").to_numpy(), kind="stable")))


def top_units(table: pa.Table, space: str, width: int, n: int) -> np.ndarray:
    """The n best units (layer, start, width) of one (space, unit width)."""
    rows = select(table, space, width)
    if not 0 <= n <= rows.num_rows:
        raise UserError(f"swap count n={n}: must be in [0, {rows.num_rows}] for {space} units of width {width}")
    return np.stack([rows.column(c).to_numpy()[:n] for c in ("layer", "start", "width")], axis=1).astype(np.int64)


# -- StyleID's .npy arrays -------------------------------------------------------------------------
def to_grid(table: pa.Table, space: LatentSpaces, name: str, width: int) -> np.ndarray:
    """Scores as a 2-D float array [layer, channel | group] (StyleID's channels_rank.npy convention;
    higher = more identity per appearance), NaN where a layer has fewer units than the widest."""
    rows = select(table, name, width)
    units = units_of(space, name, width)
    got = np.stack([rows.column(c).to_numpy() for c in ("layer", "start", "width")], axis=1)
    order = np.lexsort((got[:, 1], got[:, 0]))
    if not np.array_equal(got[order], units):
        raise UserError(f"ranks were computed for another generator layout ({name}, width {width})")
    return space.layout(name).to_grid(rows.column("score").to_numpy()[order], units)


def from_grid(grid: np.ndarray, space: LatentSpaces, name: str, width: int) -> pa.Table:
    """A rank table from a [layer, channel | group] array. Float arrays are scores (higher first);
    integer arrays are rank positions (0 first), turned into scores by negation."""
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise UserError(f"rank array must be 2-D [layer, channel|group], got shape {list(grid.shape)}")
    units = units_of(space, name, width)
    values = space.layout(name).from_grid(grid, units)
    score = -values if np.issubdtype(grid.dtype, np.integer) else values
    if not np.isfinite(score).all():
        raise UserError("rank array has NaN/inf where this generator has units")
    nan = np.full(len(units), np.nan)
    return _table(space, name, width, nan, nan, score)


def _ranks_of(score: np.ndarray) -> np.ndarray:
    """Rank positions, best (highest score) first; ties go to the earlier unit."""
    order = np.lexsort((np.arange(len(score)), -score))
    rank = np.empty(len(score), np.int64)
    rank[order] = np.arange(len(score))
    return rank
