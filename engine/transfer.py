"""Device → host copies that do not stop the host, and `torch.compile` of the job's two networks.

On CUDA a batch's uint8 images are copied into pinned (page-locked) host memory on a side stream
with `non_blocking=True`: the host goes on queueing the embedder's kernels while the copy runs, and
waits for it only when it needs the pixels (`HostCopy.numpy`). From pageable memory the copy would
be synchronous and the device would drain its queue first. On a CPU the "copy" is the tensor itself.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("facegen")

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class HostCopy:
    """A copy of `tensor` (made contiguous) on the host, started now, waited for by `numpy()`."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type != "cuda":
            self.host = tensor.contiguous()
            return
        device = tensor.device
        stream = _COPY_STREAMS.setdefault(device, torch.cuda.Stream(device))
        source = tensor.contiguous()
        stream.wait_stream(torch.cuda.current_stream(device))  # the copy starts after the image is made
        with torch.cuda.stream(stream):
            self.host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self.host.copy_(source, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        source.record_stream(stream)  # the allocator must not reuse `source` before the copy ends

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def compile_networks(generator: torch.nn.Module, embedder, backend: str = "inductor") -> None:
    """`torch.compile` the synthesis network and the embedder's module in place: their state dicts,
    fingerprints and outputs (up to float rounding) stay as they were. Compiling happens at the first
    call and again for a batch size not seen before (dynamic shapes after the second size); on a CPU
    inductor builds C++ kernels with the system compiler, minutes for a full-size generator."""
    synthesis = getattr(generator, "synthesis", None)
    (synthesis if isinstance(synthesis, torch.nn.Module) else generator).compile(backend=backend)
    module = getattr(embedder, "module", None)
    if isinstance(module, torch.nn.Module):
        module.compile(backend=backend)
    else:
        log.info("run.compile: the %s embedder is not a torch module; it runs as it is", type(embedder).__name__)
