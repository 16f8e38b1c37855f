"""`facegen generate` with privacy.repair: more identities per proposal, nothing above the threshold,
`facegen audit` agrees, resume writes the same bytes, and bad settings are one clear error."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facegen.jobs.cli import main
from tests.cluster.outputs import assert_same_dataset, digests
from tests.engine.crowded import CROWDED_SLOTS, repair_flags, write_crowded_job


@pytest.fixture(scope="module")
def crowded(tmp_path_factory) -> dict[str, str]:
    return write_crowded_job(tmp_path_factory.mktemp("crowded"))


@pytest.fixture(scope="module")
def plain(crowded) -> Path:
    out = Path(crowded["job"]).parent / "plain"
    assert main(["generate", crowded["job"], "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def repaired(crowded) -> Path:
    out = Path(crowded["job"]).parent / "repaired"
    assert main(["generate", crowded["job"], "--out", str(out), *repair_flags(crowded["ranks"])]) == 0
    return out


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.mark.slow
def test_repair_raises_the_identity_yield_with_no_sample_above_the_threshold(plain, repaired):
    before, after = report(plain), report(repaired)
    # Without repair the first CROWDED_SLOTS anchors are all refused; with it most of them are kept.
    assert before["identities"]["proposal_verdicts"]["privacy"] >= CROWDED_SLOTS
    assert before["identities"]["accepted"] == after["identities"]["accepted"] == 4
    assert after["identities"]["proposed"] < before["identities"]["proposed"]
    identities = pq.read_table(repaired / "identities.parquet").to_pydict()
    levels = identities["repair"]
    assert sum(level >= 0 for level in levels) == after["repair"]["identities"]["repaired"] >= 2
    assert all(slot < CROWDED_SLOTS for slot, level in zip(identities["slot"], levels) if level >= 0)
    repair = after["repair"]
    assert repair["settings"]["n"] == 3 and repair["settings"]["unit_width"] == 0
    assert repair["identities"]["tried"] == repair["identities"]["repaired"] + sum(
        repair["identities"]["rejected"].values())
    # Zero samples above the threshold, also among the repaired ones.
    certificate = after["privacy_certificate"]
    assert certificate["violations"] == 0 and certificate["max_real_similarity"] <= 0.95
    manifest = pq.read_table(sorted((repaired / "manifest").iterdir())).to_pydict()
    assert repair["samples"]["written_with_swapped_identity"] == sum(level >= 0 for level in manifest["repair"]) > 0
    assert max(manifest["privacy_max_sim"]) <= 0.95
    assert "repair" in (repaired / "report.html").read_text()
    assert "repair" not in report(plain) and "repair" not in pq.read_table(plain / "identities.parquet").column_names


def test_audit_agrees_with_the_repaired_dataset(crowded, repaired, capsys):
    capsys.readouterr()
    code = main(["audit", str(repaired), "--index", crowded["index"], "--embedder", crowded["embedder"], "--json"])
    audit = json.loads(capsys.readouterr().out)
    assert code == 0 and audit["violations"] == 0 and audit["complete"] is True
    assert audit["max_similarity"] == pytest.approx(report(repaired)["privacy_certificate"]["max_real_similarity"],
                                                    abs=1e-5)


@pytest.mark.slow
def test_a_rerun_and_an_interrupted_resume_write_the_same_bytes(crowded, repaired, tmp_path):
    again = tmp_path / "again"
    assert main(["generate", crowded["job"], "--out", str(again), *repair_flags(crowded["ranks"])]) == 0
    assert_same_dataset(again, repaired)
    # An interrupted run: shard 1's marker never written (its shard file left behind), no report yet.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(repaired, interrupted)
    (interrupted / "done" / "000001.json").unlink()
    (interrupted / "report.json").unlink()
    assert main(["generate", crowded["job"], "--out", str(interrupted), "--resume",
                 *repair_flags(crowded["ranks"])]) == 0
    assert digests(interrupted) == digests(repaired)


def test_a_resume_with_other_repair_settings_is_refused(crowded, repaired, tmp_path, capsys):
    before = digests(repaired)
    capsys.readouterr()
    assert main(["generate", crowded["job"], "--out", str(repaired), "--resume",
                 *repair_flags(crowded["ranks"], n=2)]) == 2
    assert "privacy.repair.n" in capsys.readouterr().err
    # Same path, other contents: the units it picks differ, so does their digest.
    from facegen.engine.anonymise.rank import ranks_bytes, read_ranks

    path = Path(crowded["ranks"])
    original = path.read_bytes()
    table = read_ranks(original)
    reversed_rank = table.set_column(table.schema.get_field_index("rank"), "rank",
                                     [list(reversed(table["rank"].to_pylist()))])
    try:
        path.write_bytes(ranks_bytes(reversed_rank))
        assert main(["generate", crowded["job"], "--out", str(repaired), "--resume",
                     *repair_flags(crowded["ranks"])]) == 2
    finally:
        path.write_bytes(original)
    err = capsys.readouterr().err
    assert "in: privacy.repair.units_sha256" in err, err
    assert digests(repaired) == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "privacy.repair.ranks=/no/such/ranks.parquet"],
     "privacy.repair.ranks: /no/such/ranks.parquet: file not found"),
    (["--set", "privacy.repair.n=3"], "privacy.repair.ranks: required"),
    (["--set", "privacy.repair.ranks=R", "--set", "privacy.repair.tries=0"],
     "privacy.repair.tries: Input should be greater than or equal to 1"),
    (["--set", "privacy.repair.ranks=R", "--set", "privacy.repair.colour=1"], "privacy.repair.colour: unknown key"),
    (["--set", "privacy.repair.ranks=R", "--set", "privacy.repair.n=99"],
     "privacy.repair.n: 99 is more than the 8 wplus units of width 0"),
])
def test_bad_repair_settings_are_one_clear_error_and_write_nothing(crowded, tmp_path, capsys, flags, message):
    flags = [f.replace("=R", "=" + crowded["ranks"]) for f in flags]
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["generate", crowded["job"], "--out", str(out), "--set", "privacy.repair.unit_width=0", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
