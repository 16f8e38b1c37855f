"""The same job with 1 and with 2 intra-op threads writes the same bytes.

ATen picks the CPU kernel of a small-batch 1x1 convolution by thread count, so before the torgb / toseg
heads became GEMMs (`models.ops.conv1x1`) a single-threaded run wrote other pixels than a two-thread
run. Each run is its own process: the thread count is set before any torch work, as in an actor.
"""

import subprocess
import sys

import pytest

from tests.cluster.outputs import digests
from tests.engine.tiny import write_tiny_job

RUN = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from facegen.engine.local import run_local
from facegen.engine.spec import build_spec, load_spec_file
from facegen.models.loading import load_generator
spec = build_spec(load_spec_file(sys.argv[2]), ["output.uri=" + sys.argv[3]])
run_local(spec, progress=False)
# The float images too: a last-bit change reaches a shard only when it crosses a uint8 level (rare
# for a tiny job), so the unquantised output is what shows a thread-dependent kernel at once.
import hashlib
G = load_generator(spec.generator.path).eval()
torch.manual_seed(0)
z, c = torch.randn(3, G.z_dim), torch.randn(3, G.c_dim)
digest = hashlib.sha256()
with torch.inference_mode():
    for fast, channels_last in ((True, False), (False, True)):
        vis, nir = G(z, c, fast=fast, channels_last=channels_last)
        digest.update(vis.numpy().tobytes() + nir.numpy().tobytes())
assert torch.get_num_threads() == int(sys.argv[1])
print("floats", digest.hexdigest())
"""


@pytest.mark.slow
def test_one_and_two_threads_write_identical_shards(tmp_path):
    # batch 8 < 16: the batch size at which ATen's 1x1-convolution kernel choice depended on threads
    job = write_tiny_job(tmp_path, str(tmp_path / "unused"), batch_size=8)
    outputs = {}
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}"
        done = subprocess.run([sys.executable, "-c", RUN, str(threads), job, str(out)], timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        floats = [line for line in done.stdout.splitlines() if line.startswith("floats ")]
        outputs[threads] = digests(out), floats
    assert len(outputs[1][0]) >= 4 + 1  # shards, manifests, markers and identities.parquet were written
    assert len(outputs[1][1]) == 1
    assert outputs[1] == outputs[2]
