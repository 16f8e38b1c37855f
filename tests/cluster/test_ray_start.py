"""A Ray node that misses its start-up deadline is one message (JobFailed: exit 1), not a traceback."""

import pytest

from facegen.cluster import ray_start
from facegen.models.errors import JobFailed

# What Ray's node.py raises when the raylet does not register within its 30 s.
TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


def _raise(err):
    def init(**options):
        raise err
    return init


@pytest.mark.parametrize("address, where", [(None, "on this machine (embedded)"),
                                            ("10.0.0.2:6379", "at 10.0.0.2:6379")])
def test_a_startup_timeout_names_the_remedies(monkeypatch, address, where):
    monkeypatch.setattr(ray_start.ray, "init", _raise(TIMEOUT))
    with pytest.raises(JobFailed) as caught:
        ray_start.init_ray(address=address, include_dashboard=False)
    message = str(caught.value)
    assert message.startswith(f"Ray did not start {where}: its node timed out during startup")
    assert "ray start --head" in message and caught.value.__cause__ is None


def test_other_start_errors_pass_through(monkeypatch):
    monkeypatch.setattr(ray_start.ray, "init", _raise(ConnectionError("no cluster")))
    with pytest.raises(ConnectionError, match="no cluster"):
        ray_start.init_ray(address="10.0.0.2:6379")
