"""Privacy index of real identity embeddings: build, query (exact max cosine), calibrate.

See docs/index.md. Nothing here imports Ray: `IndexShard` objects and `reduce_max` are what the
cluster layer distributes (one shard per actor, fan-out, max-reduce).
"""

from facegen.engine.index.backends import BACKENDS, faiss_has_gpu
from facegen.engine.index.build import build_index, plan_shards
from facegen.engine.index.calibrate import (
    DEFAULT_COMPAT_THRESHOLDS,
    DEFAULT_FMRS,
    CalibrationScores,
    calibrate,
    calibration_scores,
    threshold_at_fmr,
)
from facegen.engine.index.protocol import Index
from facegen.engine.index.prune import ClusteredShard
from facegen.engine.index.search import IndexShard, PrivacyIndex, reduce_max, reduce_topk
from facegen.engine.index.sources import (
    EmbeddingSource,
    embeddings_from_identity_features,
    embeddings_from_images,
    embeddings_from_table,
)
from facegen.engine.index.store import FORMAT_VERSION, IndexInfo, ShardInfo, normalize_rows

__all__ = [
    "BACKENDS",
    "DEFAULT_COMPAT_THRESHOLDS",
    "DEFAULT_FMRS",
    "FORMAT_VERSION",
    "CalibrationScores",
    "ClusteredShard",
    "EmbeddingSource",
    "Index",
    "IndexInfo",
    "IndexShard",
    "PrivacyIndex",
    "ShardInfo",
    "build_index",
    "calibrate",
    "calibration_scores",
    "embeddings_from_identity_features",
    "embeddings_from_images",
    "embeddings_from_table",
    "faiss_has_gpu",
    "normalize_rows",
    "plan_shards",
    "reduce_max",
    "reduce_topk",
    "threshold_at_fmr",
]
