"""Starting or joining Ray with one clear message when it cannot start.

An embedded Ray that misses its start-up deadline (a busy or memory-starved machine) raises a bare
`Exception` from deep inside Ray; facegen turns that into one line that says what to do instead.
"""

from __future__ import annotations

from typing import Any

import ray

from facegen.models.errors import JobFailed

STARTUP_TIMEOUT = "timed out during startup"


def init_ray(**options: Any) -> None:
    """`ray.init(**options)`; a node start-up timeout becomes a JobFailed naming the remedies."""
    try:
        ray.init(**options)
    except Exception as err:
        if STARTUP_TIMEOUT not in str(err):
            raise
        where = f"at {options['address']}" if options.get("address") else "on this machine (embedded)"
        raise JobFailed(f"Ray did not start {where}: its node {STARTUP_TIMEOUT}, usually because the machine "
                        "is too busy or short of memory; rerun when it is quieter, or start Ray yourself "
                        "(`ray start --head`) and pass its address (--address / run.address)") from None
