"""Checkpoints that must be refused with one message (exit 2), never a traceback or torch's advice."""

import pickle
import sys

import numpy as np
import torch

from facegen.jobs.cli import main


class _HugeArray:
    """Pickles as numpy's `_reconstruct(ndarray, (10**13,), 'b')`: 9 TiB asked for before any check."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (10**13,), b"b"))


def test_absurd_array_is_one_message_exit_2(tmp_path, capsys):
    path = tmp_path / "huge.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _HugeArray()}, protocol=2))
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "would need 9.31e+03 GiB" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_only_refusal_does_not_repeat_torchs_advice(tmp_path, capsys, monkeypatch):
    module = tmp_path / "evilmod.py"
    module.write_text("class Payload:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import evilmod

    path = tmp_path / "g.pt"
    torch.save({"g_ema": {"input.input": torch.zeros(1)}, "args": evilmod.Payload()}, path)
    del sys.modules["evilmod"]
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "refused by torch's weights-only loader: Unsupported global: GLOBAL evilmod.Payload" in err
    advice = err.replace(str(path), "")  # the test's own folder name mentions weights_only
    assert "weights_only" not in advice and "trust" not in advice and err.count("\n") == 1
