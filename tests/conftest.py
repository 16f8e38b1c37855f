"""Shared fixtures. Tests use tiny models and finish the suite in minutes on 2 CPU cores."""

import os

import pytest
import torch

# Two cores here; keep torch from oversubscribing them when Ray workers run beside the tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session, on a loopback address (never the LAN)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            _node_ip_address="127.0.0.2",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
