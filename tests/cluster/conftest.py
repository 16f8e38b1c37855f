"""Fixtures of the cluster tests: one tiny job and its local-executor reference, shared by the session."""

from pathlib import Path

import pytest

from tests.engine.tiny import write_tiny_job

# 12 shards of one identity x 2 samples: enough shards that a worker killed mid-job still has work.
CLUSTER_JOB = {"identities": 12, "samples_per_identity": 2, "output.samples_per_shard": 2}


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cluster-job")
    return write_tiny_job(folder, str(folder / "reference"), **CLUSTER_JOB)


@pytest.fixture(scope="session")
def reference(tiny_job) -> Path:
    """The local executor's output for the tiny job: what every Ray run must equal byte for byte."""
    from facegen.engine.local import run_local
    from facegen.engine.spec import build_spec, load_spec_file

    run_local(build_spec(load_spec_file(tiny_job)), progress=False)
    return Path(tiny_job).parent / "reference"
