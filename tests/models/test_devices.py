"""The one device rule every command, job and training run uses."""

import pytest
import torch

from facegen.models.devices import resolve_device
from facegen.models.errors import UserError


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device() == expected


def test_cuda_without_a_gpu_and_bad_names_are_user_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device is available here"):
            resolve_device("cuda", what="--device")
        with pytest.raises(UserError, match="run.device cuda:1: no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(UserError, match="run.device: must be one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.gpu
def test_cuda_with_a_gpu():
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
