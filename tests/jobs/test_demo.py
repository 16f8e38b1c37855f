"""The benchmarks' demo job (jobs/demo.py): its privacy FMR fits the enrolled population."""

import yaml

from facegen.jobs.demo import EXAMPLE, demo_fmr


def test_demo_fmr_fits_the_population():
    assert yaml.safe_load(EXAMPLE.read_text())["privacy"]["threshold"] == "auto"
    assert demo_fmr(1e-3, 400) == 1e-3  # 79,800 impostor pairs >= 10 / 1e-3
    assert demo_fmr(1e-3, 40) == 5e-2  # 780 pairs: only 5e-2 is resolved
