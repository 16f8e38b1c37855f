"""A quiet, honest CLI: fast start, progress lines off a terminal, clean Ctrl-C / SIGTERM, a dry run that checks."""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facegen.engine.progress import LineProgress, progress_bar
from facegen.jobs.cli import main
from tests.engine.tiny import write_tiny_job

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "faiss", "pyarrow", "webdataset")


# -- start ---------------------------------------------------------------------------------------------
def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys, facegen.jobs.cli as cli; cli.build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_every_command_and_a_bad_flag_exits_2(capsys):
    from facegen.jobs.cli import COMMAND_MODULES, build_parser

    text = build_parser().format_help()
    assert all(name in text for name in ("generate", "world", "preview", "bench"))
    assert len(COMMAND_MODULES) == len(set(COMMAND_MODULES))
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--no-such-flag"])
    assert stop.value.code == 2
    assert main(["bench"]) == 2


def test_copies_kept_for_a_fast_start_match_the_engine():
    from facegen.engine import features
    from facegen.engine.index import BACKENDS, DEFAULT_FMRS
    from facegen.jobs.commands import features as features_command
    from facegen.jobs.commands import index as index_command
    from facegen.jobs.commands import models as models_command
    from facegen.models.checkpoint import FAMILIES

    assert (index_command.BACKENDS, index_command.DEFAULT_FMRS) == (BACKENDS, DEFAULT_FMRS)
    assert (features_command.FEATURES_FILE, features_command.NIR_FEATURES_FILE, features_command.MODES) == (
        features.FEATURES_FILE, features.NIR_FEATURES_FILE, features.MODES)
    assert models_command.FAMILY_NAMES == tuple(sorted(FAMILIES))


# -- progress --------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_are_throttled_and_say_rate_and_eta():
    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(5, "shards", "shard", stream, interval=10.0, clock=clock)
    for _ in range(5):
        clock.now += 4.0  # one shard every 4 s: a line at 12 s, none at 16 s or 20 s, then the closing line
        bar.update(1)
        bar.set_postfix(samples=2 * bar.n)
    bar.close()
    bar.close()
    assert stream.getvalue().splitlines() == [
        "facegen: shards 3/5 (60%) 0.25 shard/s ETA 8s elapsed 12s samples=4",
        "facegen: shards 5/5 (100%) 0.25 shard/s elapsed 20s samples=10",
    ]


def test_durations_read_as_the_progress_lines_and_the_training_log_write_them():
    from facegen.engine.progress import duration

    assert [duration(s) for s in (42, 187, 7387, 93780)] == ["42s", "3m07s", "2h03m07s", "1d02h03m"]
    assert [duration(s, " ") for s in (187, 7387)] == ["3m 07s", "2h 03m 07s"]


def test_a_done_total_callback_gets_the_same_lines():
    from facegen.engine.progress import progress_callback

    stream = io.StringIO()
    report = progress_callback("anonymize", "shard", stream=stream)
    for done in range(4):
        report(done, 3)  # opens at 0/3, closes at 3/3
    report(1, 2)  # a second run through the same callback gets a new bar
    report(2, 2)
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["facegen: anonymize 3/3", "facegen: anonymize 2/2"]


def test_an_interrupted_bar_prints_no_closing_line():
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), LineProgress(4, "shards", "shard", stream, interval=60.0) as bar:
        bar.update(1)
        raise KeyboardInterrupt
    assert stream.getvalue() == ""


def test_a_terminal_keeps_the_tqdm_bar_and_disabled_is_silent():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with progress_bar(3, "shards", "shard", stream=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    quiet = io.StringIO()
    with progress_bar(3, "shards", "shard", enabled=False, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


# -- a real `facegen generate` process -----------------------------------------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    return write_tiny_job(folder, str(folder / "reference"), identities=6)  # 6 shards of one identity


def start(job: str, out: Path, interval: str = "3600") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEGEN_PROGRESS_SECONDS": interval}
    return subprocess.Popen([sys.executable, "-m", "facegen.jobs", "generate", job, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digests(folder: Path) -> dict[str, str]:
    files = [p for sub in ("shards", "manifest", "done") for p in sorted((folder / sub).iterdir())]
    files.append(folder / "identities.parquet")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference(job):
    """A whole run as a subprocess whose stderr is a pipe, progress lines at every update."""
    out = Path(job).parent / "reference"
    proc = start(job, out, interval="0")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out, stdout, stderr


@pytest.mark.slow
def test_progress_off_a_terminal_is_one_plain_line_per_update(reference):
    _, stdout, stderr = reference
    assert "\r" not in stderr and "\x1b" not in stderr
    shards = [line for line in stderr.splitlines() if line.startswith("facegen: shards ")]
    assert [re.match(r"facegen: shards (\d+)/6 ", line)[1] for line in shards] == ["1", "2", "3", "4", "5", "6"]
    assert all(re.search(r" [\d.]+ shard/s ", line) for line in shards)
    assert all("ETA " in line for line in shards[:-1]) and "ETA" not in shards[-1]
    assert any(line.startswith("facegen: identities 6/6 (100%)") for line in stderr.splitlines())
    assert "wrote 12 samples of 6 identities in 6 shards" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_cleanly_and_resume_is_byte_identical(job, reference, tmp_path, sig):
    out = tmp_path / "stopped"
    proc = start(job, out)
    deadline = time.time() + 300
    while not (out / "done" / "000001.json").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the job never reached the stop point"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    done = len(os.listdir(out / "done"))
    assert 2 <= done < 6, "stopped too late to test anything"
    # One line about the stop; besides it only the finished identity selection's closing progress line
    # and the enrolment sanity warning every run repeats (untrained tiny models tell nobody apart).
    lines = [line for line in stderr.splitlines() if not line.startswith(("facegen: identities 6/6 (100%)",
                                                                          "facegen: WARNING: different identities"))]
    assert lines == [f"facegen: interrupted after {done} of 6 shards; rerun with --resume"]
    assert not (out / "report.json").exists()
    assert main(["generate", job, "--out", str(out), "--resume"]) == 0
    assert digests(out) == digests(reference[0])


# -- --dry-run -------------------------------------------------------------------------------------------
def test_dry_run_opens_every_input_and_writes_nothing(job, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["generate", job, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    folder = Path(job).parent
    assert f"# generator {folder}/G.safetensors: native, 32 px, c_dim 32, VIS+NIR" in text
    assert f"# index     {folder}/index: 40 embeddings, dim 32, built with this embedder" in text
    assert f"# output    new job in {out}" in text and "# plan: 6 identities x 2 samples in 6 shards" in text
    assert not out.exists()


def other_embedder(tmp_path: Path, dim: int = 32) -> str:
    import torch

    from facegen.models.checkpoint import save_native
    from facegen.models.embedder import Preprocessing, TorchEmbedder
    from facegen.models.iresnet import IResNet, IResNetConfig

    torch.manual_seed(7)
    module = IResNet(IResNetConfig(depth=18, embedding_dim=dim, input_size=32, base_width=8))
    path = save_native(TorchEmbedder(module, Preprocessing(input_size=32)).module, tmp_path / f"E{dim}.safetensors")
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing generator", "/nonexistent/G.safetensors: file not found"),
    ("missing index", "nonexistent-index"),
    ("embedder of another width", "c_dim 32 != embedder width 16"),
    ("index of another embedder", "fingerprint"),
    ("missing face detector", "filter.face_detector: /nonexistent/yunet.onnx: file not found"),
    ("unwritable output", "not writable"),
])
def test_dry_run_refuses_what_the_run_would_refuse(job, tmp_path, capsys, case, message):
    out = tmp_path / "dry"
    args = ["generate", job, "--out", str(out), "--dry-run"]
    args += {
        "missing generator": ["--generator", "/nonexistent/G.safetensors"],
        "missing index": ["--index", "/nonexistent-index"],
        "embedder of another width": ["--embedder", other_embedder(tmp_path, 16)],
        "index of another embedder": ["--embedder", other_embedder(tmp_path)],
        "missing face detector": ["--set", "filter.quality_gate=frontal", "--set",
                                  "filter.face_detector=/nonexistent/yunet.onnx"],
        "unwritable output": [],
    }[case]
    if case == "unwritable output":
        (tmp_path / "file").write_text("x")
        args[3] = str(tmp_path / "file" / "out")
    assert main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("error:") == 1 and captured.out == ""
    assert not out.exists()


@pytest.mark.slow
def test_dry_run_refuses_an_existing_job_unless_resumed_with_the_same_spec(job, reference, capsys):
    out = str(reference[0])
    before = digests(reference[0])
    assert main(["generate", job, "--out", out, "--dry-run"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["generate", job, "--out", out, "--dry-run", "--resume", "--set", "seed=5"]) == 2
    assert "differs from the one in" in capsys.readouterr().err
    assert main(["generate", job, "--out", out, "--dry-run", "--resume"]) == 0
    assert f"# output    resume the job in {out} (6 shards done)" in capsys.readouterr().out
    assert digests(reference[0]) == before
    assert json.loads((reference[0] / "report.json").read_text())["samples"]["written"] == 12


def test_a_finished_command_exits_with_its_own_code_every_time(tmp_path):
    """A parquet read leaves Arrow's thread pool behind, whose exit-time destructor aborted about one
    `index query` in four on an index this size ("terminate called without an active exception", -6)
    after the results were printed; the command now ends past native destructors, with its own code
    and all its output. (Eight runs catch that rate nine times in ten.)"""
    rng = np.random.default_rng(0)
    names = [f"{i:04d}_{s:02d}.png" for i in range(50) for s in range(4)]
    (tmp_path / "identity_features.json").write_text(
        json.dumps({n: v.tolist() for n, v in zip(names, rng.standard_normal((200, 128)))}))
    features = tmp_path / "identity_features.json"
    assert main(["index", "build", str(tmp_path / "index"), "--features", str(features)]) == 0
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 128)).astype(np.float32))
    for _ in range(8):
        done = subprocess.run([sys.executable, "-m", "facegen.jobs", "index", "query", str(tmp_path / "index"),
                               "--embeddings", str(tmp_path / "q.npy"), "--json"], capture_output=True, text=True)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]
        assert len(done.stdout.strip().splitlines()) == 3
