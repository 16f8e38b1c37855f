"""One writer per output (`engine.lease`): a second run is refused while the first is alive, a dead
run's lease is waited out and taken over, and a writer without the lease never publishes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.job import PreparedShard, publish_shard
from facegen.engine.lease import LEASE_FILE, Lease, LeaseLost, read_lease
from facegen.engine.spec import build_spec, load_spec_file
from facegen.engine.storage import Storage
from facegen.jobs.cli import main
from facegen.models.errors import UserError
from tests.cluster.outputs import assert_same_dataset
from tests.engine.tiny import write_tiny_job

ROOT = Path(__file__).resolve().parents[2]


def test_a_live_lease_refuses_a_second_holder_and_names_the_first(tmp_path):
    out = Storage(str(tmp_path / "out"))
    with Lease(out, ttl=30).acquire() as first:
        with pytest.raises(UserError) as refused:
            Lease(out, ttl=30).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and first.owner[:8] in message and "--resume" in message
        assert read_lease(out).owner == first.owner  # the refused run changed nothing
    assert not out.exists(LEASE_FILE)  # released
    second = Lease(out, ttl=30).acquire()
    assert read_lease(out).owner == second.owner
    second.release()


def test_an_expired_lease_is_taken_over_and_its_holder_can_no_longer_publish(tmp_path):
    out = Storage(str(tmp_path / "out"))
    stale = Lease(out, ttl=0.5).acquire()  # no heartbeat: expires in half a second
    guard = stale.guard(margin=0.1)
    guard.check()  # still valid
    time.sleep(0.6)
    with pytest.raises(LeaseLost, match="expires in"):
        guard.check()  # expired: nobody renewed it, so another run may take it any moment
    new = Lease(out, ttl=30).acquire()
    assert read_lease(out).owner == new.owner
    with pytest.raises(LeaseLost, match="is gone"):
        guard.check()
    stale.renew()
    assert stale.lost and "was taken by" in stale.lost and read_lease(out).owner == new.owner
    new.release()


def test_an_empty_lease_file_left_by_a_crash_is_taken_over(tmp_path):
    out = Storage(str(tmp_path / "out"))
    out.makedirs()
    (tmp_path / "out" / LEASE_FILE).write_bytes(b"")  # created, never written
    lease = Lease(out, ttl=30).acquire()
    assert read_lease(out).owner == lease.owner
    lease.release()


def test_waiting_for_a_live_lease_takes_it_when_the_holder_releases(tmp_path):
    out = Storage(str(tmp_path / "out"))
    first = Lease(out, ttl=30).acquire()
    threading.Timer(0.8, first.release).start()  # the first run ends while the second waits
    start = time.time()
    second = Lease(out, ttl=30).acquire(wait=20, poll=0.1)
    assert 0.7 < time.time() - start < 10 and read_lease(out).owner == second.owner
    second.release()


def _prepared(shard_id: int) -> PreparedShard:
    rng = np.random.default_rng(shard_id)
    batch = ShardBatch(labels=np.array([0, 0]), samples=np.array([0, 1]),
                       vis=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), nir=None,
                       metas=[{"privacy_max_sim": 0.1}, {"privacy_max_sim": 0.2}])
    return PreparedShard(shard_id, batch, {"attempts": 2}, nearest=None)


def test_a_writer_holding_a_stale_lease_id_does_not_publish(tmp_path):
    spec = build_spec({"generator": {"path": "-"}, "embedder": {"path": "-"}, "index": {"uri": "-"},
                       "output": {"uri": str(tmp_path / "out")}})
    out = Storage(spec.output.uri)
    old = Lease(out, ttl=30).acquire()
    stale_guard = old.guard()
    publish_shard(spec.output, out, _prepared(0), stale_guard.check)  # published while it held the lease
    marker = (tmp_path / "out" / "done" / "000000.json").read_bytes()
    old.release()  # its driver is gone (expiry itself: the test above)
    new = Lease(out, ttl=30).acquire()  # and another run holds the output now
    for shard_id in (0, 1):  # neither replaces a published marker nor publishes a new shard
        with pytest.raises(LeaseLost):
            publish_shard(spec.output, out, _prepared(shard_id), stale_guard.check)
    assert (tmp_path / "out" / "done" / "000000.json").read_bytes() == marker
    assert not (tmp_path / "out" / "done" / "000001.json").exists()
    publish_shard(spec.output, out, _prepared(1), new.guard().check)  # the holder publishes
    assert (tmp_path / "out" / "done" / "000001.json").exists()
    new.release()


@pytest.mark.slow
def test_second_run_refused_while_the_first_lives_and_resume_after_kill_takes_over(tmp_path, capsys):
    """Process A runs the job; a second `generate --resume` while A lives is refused (exit 2, naming A).
    After `kill -9` of A's process group, a resume waits until A's lease expires (A's workers could
    still publish until then), takes it over and completes the dataset: the bytes of an undisturbed
    run, every sample once."""
    ttl = 8
    job = write_tiny_job(tmp_path, str(tmp_path / "reference"), identities=6)
    from facegen.engine.local import run_local

    run_local(build_spec(load_spec_file(job)), progress=False)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEGEN_PROGRESS_SECONDS": "3600"}
    a = subprocess.Popen([sys.executable, "-m", "facegen.jobs", "generate", job, "--out", str(out),
                          "--set", f"run.lease_ttl={ttl}"], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "done").exists() or not list((out / "done").iterdir()):  # a shard published
            assert a.poll() is None and time.time() < deadline, a.communicate()[1][-3000:]
            time.sleep(0.01)
        os.killpg(a.pid, signal.SIGSTOP)  # A stays alive (and holds its lease) while B tries
        holder = read_lease(Storage(str(out)))
        assert holder.pid == a.pid and holder.left() > 1
        capsys.readouterr()
        assert main(["generate", job, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by another facegen run: pid {a.pid}" in err and "--resume" in err
        assert read_lease(Storage(str(out))).owner == holder.owner  # B changed nothing
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
    expires = read_lease(Storage(str(out))).expires
    assert main(["generate", job, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"held by pid {a.pid}" in err and "its process is gone; waiting for its lease to expire" in err
    assert time.time() >= expires  # it waited for the expiry before taking over
    assert not (out / LEASE_FILE).exists()  # released at the end
    assert_same_dataset(out, tmp_path / "reference")


def test_dry_run_refuses_while_a_live_run_holds_the_output(tmp_path, capsys):
    job = write_tiny_job(tmp_path, str(tmp_path / "out"))
    out = Storage(str(tmp_path / "out"))
    with Lease(out, ttl=30).acquire():
        assert main(["generate", job, "--dry-run"]) == 2
        assert f"is held by another facegen run, pid {os.getpid()}" in capsys.readouterr().err
        assert main(["generate", job, "--dry-run", "--set", "run.lease_wait=60"]) == 0
        assert "the run would wait up to 60 s" in capsys.readouterr().out
