"""Privacy-index queries equal a numpy brute-force reference, whatever the backend and sharding."""

import pickle

import numpy as np
import pytest
import torch

from facegen.engine.index import IndexShard, PrivacyIndex, build_index, reduce_max
from facegen.engine.storage import Storage
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, IResNetConfig

DIM = 24
BACKENDS = ["faiss", "torch", "numpy"]


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(tmp_path, rng, count=101, **shards):
    raw = rng.standard_normal((count, DIM)).astype(np.float32) * 3  # build_index normalises
    identities = [f"id{i % 17}" for i in range(count)]
    files = [f"id{i % 17}_{i}.png" for i in range(count)]
    info = build_index(raw, identities, files, Storage(str(tmp_path)), embedder_fingerprint="abc",
                       preprocessing={"input_size": 32}, **shards)
    vectors = raw / np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)
    return info, vectors.astype(np.float32), np.asarray(identities, object), np.asarray(files, object)


def reference(queries, vectors):
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return sims.max(axis=1), sims.argmax(axis=1)


SHARDINGS = [
    {"shard_size": 1_000_000},  # one shard
    {"shard_size": 7},  # uneven: 14 shards of 7 and one of 3
    {"shard_sizes": [40, 1, 33, 27]},  # includes a single-row shard
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sharding", SHARDINGS, ids=["one", "size7", "explicit"])
def test_max_similarity_equals_brute_force(tmp_path, backend, sharding):
    rng = np.random.default_rng(1)
    info, vectors, identities, files = make_index(tmp_path, rng, **sharding)
    queries = np.concatenate([unit(rng, 60), vectors[[0, 40, 100]]])  # plus exact hits in 3 shards
    index = PrivacyIndex.open(str(tmp_path), backend=backend)
    assert (index.count, index.dim, index.num_shards, index.fingerprint) == (101, DIM, info.num_shards, "abc")
    sims, rows = index.max_similarity(queries)
    ref_sims, ref_rows = reference(queries, vectors)
    assert sims.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(rows[-3:], [0, 40, 100])
    np.testing.assert_array_equal(index.identity_of(rows), identities[ref_rows])
    np.testing.assert_array_equal(index.file_of(rows), files[ref_rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_queries_accepted(tmp_path, backend):
    rng = np.random.default_rng(2)
    _, vectors, _, _ = make_index(tmp_path, rng, shard_size=30)
    queries = unit(rng, 9)
    index = PrivacyIndex.open(str(tmp_path), backend=backend)
    from_torch = index.max_similarity(torch.from_numpy(queries))
    from_numpy = index.max_similarity(queries)
    np.testing.assert_array_equal(from_torch[0], from_numpy[0])
    np.testing.assert_array_equal(from_torch[1], from_numpy[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_plus_reduce_max_equal_whole_index(tmp_path, backend):
    rng = np.random.default_rng(3)
    make_index(tmp_path, rng, shard_sizes=[10, 1, 50, 40])
    index = PrivacyIndex.open(str(tmp_path), backend=backend)
    queries = unit(rng, 25)
    # Each shard travels by pickle (as to an index-shard actor) and loads itself where it lands.
    shards = [pickle.loads(pickle.dumps(index.shard(i))) for i in range(index.num_shards)]
    assert all(s._vectors is None for s in shards)
    parts = [s.max_similarity(queries) for s in shards]
    for shard, (_, rows) in zip(shards, parts):
        assert ((rows >= shard.offset) & (rows < shard.offset + shard.count)).all()
    whole = index.max_similarity(queries)
    for order in (parts, parts[::-1]):
        sims, rows = reduce_max(order)
        np.testing.assert_array_equal(sims, whole[0])
        np.testing.assert_array_equal(rows, whole[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_smallest_row(tmp_path, backend):
    rng = np.random.default_rng(4)
    vectors = unit(rng, 12)
    vectors[[2, 5, 9]] = vectors[9]  # one vector enrolled three times, across shards [0:4) [4:8) [8:12)
    build_index(vectors, ["a"] * 12, [f"a_{i}" for i in range(12)], Storage(str(tmp_path)),
                embedder_fingerprint=None, preprocessing=None, shard_size=4)
    index = PrivacyIndex.open(str(tmp_path), backend=backend)
    queries = np.repeat(vectors[[9]], 30, axis=0)  # 30 queries: faiss switches to its BLAS path at 20
    sims, rows = index.max_similarity(queries)
    assert (rows == 2).all()
    sims, rows = index.search(vectors[[9]], 3)
    np.testing.assert_array_equal(rows[0], [2, 5, 9])


def test_reduce_max_rules():
    sims_a = np.array([0.5, 0.7, np.nan], np.float32)
    sims_b = np.array([0.5, 0.9, np.nan], np.float32)
    rows_a, rows_b = np.array([8, 1, -1]), np.array([3, 20, -1])
    sims, rows = reduce_max([(sims_a, rows_a), (sims_b, rows_b)])
    np.testing.assert_array_equal(rows, [3, 20, -1])
    np.testing.assert_array_equal(sims[:2], np.array([0.5, 0.9], np.float32))
    assert np.isnan(sims[2])
    with pytest.raises(ValueError):
        reduce_max([])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_and_unnormalised_queries(tmp_path, backend):
    rng = np.random.default_rng(5)
    _, vectors, _, _ = make_index(tmp_path, rng, shard_size=50)
    index = PrivacyIndex.open(str(tmp_path), backend=backend)
    queries = unit(rng, 4)
    queries[1, 3] = np.nan
    sims, rows = index.max_similarity(queries)
    assert np.isnan(sims[1]) and rows[1] == -1
    # The finite rows are answered normally.
    np.testing.assert_array_equal(rows[[0, 2, 3]], reference(queries[[0, 2, 3]], vectors)[1])
    assert index.identity_of(rows)[1] == ""
    with pytest.raises(ValueError, match="L2-normalised"):
        index.max_similarity(queries[[0]] * 2)
    with pytest.raises(UserError, match=f"\\[N, {DIM}\\]"):
        index.max_similarity(np.zeros((2, DIM + 1), np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_equals_reference(tmp_path, backend):
    rng = np.random.default_rng(6)
    _, vectors, _, _ = make_index(tmp_path, rng, shard_sizes=[3, 60, 38])
    index = PrivacyIndex.open(str(tmp_path), backend=backend)
    queries = unit(rng, 10)
    sims, rows = index.search(queries, 5)
    ref = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    ref_rows = np.argsort(-ref, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ref_rows, 1), atol=1e-6)
    with pytest.raises(UserError, match="top k"):
        index.search(queries, 102)


def test_in_memory_shard_matches_and_pickles_with_data():
    rng = np.random.default_rng(7)
    vectors = unit(rng, 30)
    shard = IndexShard.from_arrays(vectors, ["x"] * 30, ["f"] * 30, offset=100, backend="numpy")
    queries = unit(rng, 5)
    copy = pickle.loads(pickle.dumps(shard))
    sims, rows = copy.max_similarity(queries)
    ref_sims, ref_rows = reference(queries, vectors)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    np.testing.assert_array_equal(rows, ref_rows + 100)


def test_s3_round_trip_equals_local(tmp_path, s3_bucket):
    uri, options = s3_bucket
    rng = np.random.default_rng(8)
    raw = rng.standard_normal((40, DIM)).astype(np.float32)
    labels = ([f"{i % 5}" for i in range(40)], [f"{i % 5}_{i}.jpg" for i in range(40)])
    local = build_index(raw, *labels, Storage(str(tmp_path)), embedder_fingerprint="f",
                        preprocessing=None, shard_size=16, source="unit test")
    remote = build_index(raw, *labels, Storage(f"{uri}/idx", options), embedder_fingerprint="f",
                         preprocessing=None, shard_size=16, source="unit test")
    assert remote.to_dict() | {"created_by": ""} == local.to_dict() | {"created_by": ""}
    remote_index = PrivacyIndex.open(f"{uri}/idx", options, backend="faiss")
    local_index = PrivacyIndex.open(str(tmp_path), backend="faiss")
    assert remote_index.info == local_index.info
    queries = unit(rng, 7)
    for a, b in zip(remote_index.max_similarity(queries), local_index.max_similarity(queries)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(remote_index.labels()[1], labels[1])
    shard = pickle.loads(pickle.dumps(remote_index.shard(2)))  # storage options travel with it
    np.testing.assert_array_equal(shard.vectors(), local_index.shard(2).vectors())


def tiny_embedder(seed=0, dim=32):
    torch.manual_seed(seed)
    module = IResNet(IResNetConfig(depth=18, embedding_dim=dim, input_size=32, base_width=8))
    return TorchEmbedder(module, Preprocessing(input_size=32))


def test_check_compatible_refuses_other_embedders(tmp_path):
    embedder = tiny_embedder(0)
    rng = np.random.default_rng(9)
    build_index(rng.standard_normal((5, 32)), list("aabbc"), list("12345"), Storage(str(tmp_path)),
                embedder_fingerprint=embedder.fingerprint, preprocessing=embedder.preprocessing.to_dict())
    index = PrivacyIndex.open(str(tmp_path))
    index.check_compatible(embedder)  # same weights and preprocessing: fine
    other = tiny_embedder(1)
    with pytest.raises(UserError) as err:
        index.check_compatible(other)
    assert embedder.fingerprint[:16] in str(err.value) and other.fingerprint[:16] in str(err.value)
    with pytest.raises(UserError, match="32-d .* 16-d"):
        index.check_compatible(tiny_embedder(0, dim=16))
    # Same weights, other preprocessing: the message names exactly the fields that differ.
    raw = tiny_embedder(0).set_preprocessing(Preprocessing(input_size=32, mean=(0, 0, 0), std=(1 / 255,) * 3))
    with pytest.raises(UserError, match=r"other preprocessing \(mean: index \[0\.5, 0\.5, 0\.5\], given "
                                        r"\[0\.0, 0\.0, 0\.0\]; std: .*change mean, std"):
        index.check_compatible(raw)


def test_mismatch_names_weights_when_the_index_records_them(tmp_path):
    embedder = tiny_embedder(0)
    build_index(np.random.default_rng(9).standard_normal((5, 32)), list("aabbc"), list("12345"),
                Storage(str(tmp_path)), embedder_fingerprint=embedder.fingerprint,
                preprocessing=embedder.preprocessing.to_dict(), embedder_weights=embedder.weights_fingerprint)
    index = PrivacyIndex.open(str(tmp_path))
    assert index.info.embedder_weights == embedder.weights_fingerprint
    with pytest.raises(UserError, match="built with other weights"):
        index.check_compatible(tiny_embedder(1))
    bgr = tiny_embedder(0).set_preprocessing(Preprocessing(input_size=32, channel_order="BGR"))
    assert bgr.weights_fingerprint == embedder.weights_fingerprint and bgr.fingerprint != embedder.fingerprint
    with pytest.raises(UserError, match=r"the same weights but other preprocessing \(channel_order: index RGB, "
                                        r"given BGR\)"):
        index.check_compatible(bgr)


def test_open_refuses_bad_backend_and_missing_index(tmp_path):
    with pytest.raises(UserError, match="index.json: not found"):
        PrivacyIndex.open(str(tmp_path))
    with pytest.raises(UserError, match="backend"):
        PrivacyIndex.open(str(tmp_path), backend="annoy")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no GPU support"):
            PrivacyIndex.open(str(tmp_path), backend="faiss", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_backends_equal_brute_force(tmp_path, backend):
    rng = np.random.default_rng(10)
    _, vectors, _, _ = make_index(tmp_path, rng, shard_size=33)
    queries = unit(rng, 50)
    index = PrivacyIndex.open(str(tmp_path), backend=backend, device="cuda")
    sims, rows = index.max_similarity(torch.from_numpy(queries).cuda())
    ref_sims, ref_rows = reference(queries, vectors)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    np.testing.assert_array_equal(rows, ref_rows)


def tight_identities(rng, identities=150, per_identity=8, dim=32, noise=0.08):
    centres = rng.standard_normal((identities, dim))
    x = np.repeat(centres, per_identity, axis=0) + noise * rng.standard_normal((identities * per_identity, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_certificate_pruning_decides_like_brute_force(tmp_path):
    from facegen.engine.index.prune import ClusteredShard

    rng = np.random.default_rng(11)
    vectors = tight_identities(rng)
    near = vectors[::37] + 0.05 * rng.standard_normal((len(vectors[::37]), vectors.shape[1]))
    queries = np.concatenate([unit(rng, 200, 32), near / np.linalg.norm(near, axis=1, keepdims=True)])
    queries = queries.astype(np.float32)
    ref_sims, ref_rows = reference(queries, vectors)
    clustered = ClusteredShard.build(vectors, num_clusters=150)
    # The certificate: every member lies within its cluster's angular radius of the centroid.
    for j in range(clustered.num_clusters):
        members = clustered.vectors[clustered.bounds[j] : clustered.bounds[j + 1]].astype(np.float64)
        assert np.arccos(np.clip(members @ clustered.centroids[j], -1, 1)).max() <= clustered.radii[j]
    for tau in (0.3, 0.622, 0.9):
        sims, rows, searched = clustered.max_similarity_above(queries, tau)
        match = sims > tau
        np.testing.assert_array_equal(match, ref_sims > tau)
        np.testing.assert_allclose(sims[match], ref_sims[match], atol=1e-6)
        np.testing.assert_array_equal(rows[match], ref_rows[match])
        assert (sims[~match] <= tau).all()
        assert match.sum() >= len(near) and searched < 0.5  # tight clusters: most of the set is skipped

    # Through the index: several shards, the same decisions; NaN queries stay NaN.
    build_index(vectors, [str(i // 8) for i in range(len(vectors))], [str(i) for i in range(len(vectors))],
                Storage(str(tmp_path)), embedder_fingerprint=None, preprocessing=None, shard_size=500)
    index = PrivacyIndex.open(str(tmp_path), backend="numpy")
    queries[3] = np.nan
    sims, rows, searched = index.max_similarity_above(queries, 0.622, num_clusters=60)
    full_sims, full_rows = index.max_similarity(queries)
    match = full_sims > 0.622
    np.testing.assert_array_equal(sims > 0.622, match)
    np.testing.assert_array_equal(rows[match], full_rows[match])
    assert np.isnan(sims[3]) and rows[3] == -1 and 0 < searched < 1
