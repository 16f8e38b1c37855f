"""Index-shard actors answer exactly what one in-process PrivacyIndex answers."""

import numpy as np
import pytest
import torch

from facegen.cluster.remote_index import RemoteIndex, group_shards
from facegen.engine.index import Index, PrivacyIndex, build_index
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

pytestmark = pytest.mark.ray
DIM = 16


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((53, DIM)).astype(np.float32)
    raw[30] = raw[3]  # the same vector in two shards: a tie, decided for the smaller row
    identities = [f"id{i % 11}" for i in range(53)]
    files = [f"id{i % 11}_{i}.png" for i in range(53)]
    folder = tmp_path_factory.mktemp("index")
    build_index(raw, identities, files, Storage(str(folder)), embedder_fingerprint="fp", preprocessing={},
                shard_sizes=[10, 1, 19, 23])
    return PrivacyIndex.open(str(folder), backend="faiss")


@pytest.fixture(scope="module", params=[2, 4], ids=["2-actors", "4-actors"])
def remote(ray_session, index, request):
    remote = RemoteIndex.start(index, request.param, max_restarts=0)
    yield remote
    remote.shutdown()


def queries(index) -> np.ndarray:
    rng = np.random.default_rng(4)
    q = rng.standard_normal((40, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.concatenate([q, index.embeddings()[[3, 10, 52]]])  # exact hits, one of them a cross-shard tie
    q[5] = np.nan  # a non-finite query: NaN similarity, row -1
    return q


def test_max_similarity_is_bit_identical(remote, index):
    q = queries(index)
    sims, rows = remote.max_similarity(q)
    ref_sims, ref_rows = index.max_similarity(q)
    assert sims.dtype == ref_sims.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(sims, ref_sims)  # NaN == NaN here: exact, not approximate
    np.testing.assert_array_equal(rows, ref_rows)
    assert rows[5] == -1 and np.isnan(sims[5])
    np.testing.assert_array_equal(rows[-3:], [3, 10, 52])  # row 30 ties with row 3: the smaller wins
    torch_sims, torch_rows = remote.max_similarity(torch.from_numpy(q))  # what Bundle passes
    np.testing.assert_array_equal(torch_sims, ref_sims)
    np.testing.assert_array_equal(torch_rows, ref_rows)


def test_both_indexes_implement_the_engine_index_protocol(remote, index):
    assert isinstance(remote, Index) and isinstance(index, Index)
    assert not isinstance(object(), Index)


def test_labels_and_metadata(remote, index):
    rows = np.array([[0, 10, 11, -1], [52, 29, 30, 3]])
    np.testing.assert_array_equal(remote.identity_of(rows), index.identity_of(rows))
    np.testing.assert_array_equal(remote.file_of(rows), index.file_of(rows))
    assert remote.identity_of(rows)[0, 3] == ""
    assert (remote.count, remote.dim, remote.fingerprint) == (53, DIM, "fp")
    with pytest.raises(IndexError, match=r"\[-1, 53\)"):
        remote.identity_of([53])


def test_compatibility_check_is_the_index_one(remote):
    class Embedder:
        dim, fingerprint = DIM + 1, "fp"

    with pytest.raises(UserError, match="16-d embeddings"):
        remote.check_compatible(Embedder())


def test_bad_queries_fail_as_in_process(remote, index):
    with pytest.raises(UserError, match=r"\[N, 16\]"):
        remote.max_similarity(np.ones((2, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="L2-normalised"):
        remote.max_similarity(np.ones((2, DIM), np.float32))


@pytest.mark.parametrize(
    "counts, groups, expected",
    [
        ([10, 1, 19, 23], 2, [range(0, 3), range(3, 4)]),
        ([10, 10, 10, 10], 2, [range(0, 2), range(2, 4)]),
        ([5, 5], 7, [range(0, 1), range(1, 2)]),
        ([7], 3, [range(0, 1)]),
    ],
)
def test_group_shards(counts, groups, expected):
    assert group_shards(counts, groups) == expected


def test_remote_anchors_answer_as_the_local_anchor_search(ray_session):
    import pickle

    from facegen.cluster.remote_index import RemoteAnchors
    from facegen.engine.index.anchors import AnchorShards, max_other_above
    from facegen.engine.phases import Identities

    rng = np.random.default_rng(5)
    anchors = rng.standard_normal((53, DIM)).astype(np.float32)
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    anchors[40] = anchors[4]  # a tie across actors: the smaller label first
    local, remote = AnchorShards(anchors, shard_rows=53), RemoteAnchors.start(anchors, 3, shard_rows=10,
                                                                              max_restarts=0)
    try:
        assert len(remote.actors) == 3
        q = np.concatenate([anchors[[4, 7]], rng.standard_normal((20, DIM)).astype(np.float32)])
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        for k in (1, 2, 8):
            (got_sims, got_rows), (want_sims, want_rows) = remote.search(q, k), local.search(q, k)
            assert np.array_equal(got_rows, want_rows)
            np.testing.assert_allclose(got_sims, want_sims, rtol=0, atol=1e-6)
        own = rng.integers(0, 53, len(q))
        for tau in (0.3, 0.5):
            assert np.array_equal(max_other_above(remote.search, local.vectors, q, tau, exclude=own)[1],
                                  max_other_above(local.search, local.vectors, q, tau, exclude=own)[1])
        # The identities table travels with its remote anchors; a local search stays behind.
        table = Identities(np.arange(53), np.zeros((53, 0), np.float32), anchors, np.zeros(53, np.float32),
                           np.full(53, "", object), anchor_search=remote)
        assert isinstance(pickle.loads(pickle.dumps(table)).anchor_search, RemoteAnchors)
        table.anchor_search = local
        assert pickle.loads(pickle.dumps(table)).anchor_search is None
    finally:
        remote.shutdown()
