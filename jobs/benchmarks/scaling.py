"""`facegen bench scaling`: identity candidates per second with 1, 2, … generator actors on Ray.

Each worker count gets its own pool of generator actors, placed exactly as `facegen generate` places
them (`cluster.actors.plan_workers`: one per GPU, else one per CPU slot); their start-up (model loading)
and one warm-up block per actor are not timed. Timed: phase 1 (propose: render, embed, privacy query)
over the same `--slots` identity slots, through the executor's own ordered producer. Baseline (same run):
one worker; efficiency(n) = rate(n) / (n × rate(1)). The proposals of every worker count are compared
byte for byte (they must be identical: placement never changes results).
Control (same run, same resources): n Ray tasks of a fixed torch convolution workload, against one.
Its speed-up is what the hardware gives n workers at that moment (on a shared machine, less than n);
`vs machine` = speed-up / control speed-up separates the executor's overhead from the machine's.
Without JOB.yaml the demo job is used (tiny seeded models, `jobs/demo.py`), made in a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from facegen.jobs.benchmarks import write_record
from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scaling", help="candidates/s with 1 vs N generator actors on Ray (scaling efficiency)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", help="job spec YAML (default: the demo job on tiny models)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key (repeatable)")
    parser.add_argument("--workers", default="1,2", help="comma list of generator actor counts; the first is "
                                                         "the baseline")
    parser.add_argument("--slots", type=int, default=256, help="identity slots proposed per worker count")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per worker (default: as `facegen generate` runs them, the "
                             "actor's share of the CPUs); 1 thread per 1-CPU worker measures scaling without "
                             "oversubscription")
    parser.add_argument("--address", help="Ray cluster to join (default: an embedded local Ray)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.set_defaults(func=run)


def parse_workers(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--workers: {text!r} is not a comma list of integers") from None
    if not counts or min(counts) < 1:
        raise UserError("--workers: counts must be positive")
    return counts


def load_spec(args: argparse.Namespace, folder: Path):
    from facegen.engine.spec import build_spec, load_spec_file

    if args.job:
        return build_spec(load_spec_file(args.job), args.overrides)
    from facegen.jobs.demo import prepare_demo

    demo = prepare_demo(folder / "demo")
    return build_spec(json.loads(demo.model_dump_json()), args.overrides)


def measure(spec, out, workers: int, slots: int, threads: int | None = None) -> tuple[float, dict, list]:
    """(seconds, plan, proposals) for `workers` actors proposing slots 0..slots-1 in executor blocks."""
    import ray

    from facegen.cluster.actors import GeneratorPool, RemoteGeneratorWorker, plan_workers
    from facegen.cluster.executor import IN_FLIGHT_PER_ACTOR, ProposeMany
    from facegen.engine.job import proposal_blocks

    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"num_workers": workers})})
    plan = plan_workers(spec, ray.cluster_resources())
    if threads:
        plan = dataclasses.replace(plan, threads=threads, num_cpus=min(plan.num_cpus, float(threads)))
    pool = GeneratorPool(lambda: RemoteGeneratorWorker.options(**plan.options()).remote(spec, out, None, plan.threads),
                         plan.num_workers, capacity=IN_FLIGHT_PER_ACTOR)
    try:
        pool.start()  # model loading is not timed
        warm_up = [np.arange(i * spec.proposal_block, (i + 1) * spec.proposal_block) for i in range(workers)]
        list(ProposeMany(pool, 0)(iter(warm_up)))
        blocks = [b for b in proposal_blocks(spec) if b[0] < slots]
        blocks[-1] = blocks[-1][blocks[-1] < slots]
        started = time.perf_counter()
        proposals = list(ProposeMany(pool, 0)(iter(blocks)))
        seconds = time.perf_counter() - started
    finally:
        pool.shutdown()
    return seconds, {"workers": plan.num_workers, "gpus_per_worker": plan.num_gpus,
                     "cpus_per_worker": plan.num_cpus, "threads_per_worker": plan.threads}, proposals


def control_rate(workers: int, num_cpus: float, threads: int, iterations: int = 30) -> float:
    """Convolutions/s of `workers` Ray tasks of a fixed torch workload running at once."""
    import ray

    def convolutions(count: int, num_threads: int) -> None:
        import torch

        torch.set_num_threads(num_threads)
        x, w = torch.randn(16, 32, 32, 32), torch.randn(32, 32, 3, 3)
        for _ in range(count):
            torch.nn.functional.conv2d(x, w, padding=1)

    task = ray.remote(convolutions).options(num_cpus=num_cpus)
    ray.get([task.remote(2, threads) for _ in range(workers)])  # warm-up: workers started, torch loaded
    started = time.perf_counter()
    ray.get([task.remote(iterations, threads) for _ in range(workers)])
    return workers * iterations / (time.perf_counter() - started)


def same_proposals(a: list, b: list) -> bool:
    fields = ("slot", "condition", "anchor", "real_sim", "real_identity", "verdict")
    return len(a) == len(b) and all(
        np.array_equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b) for f in fields)


def run(args: argparse.Namespace) -> int:
    import ray

    from facegen.cluster.executor import ray_connection
    from facegen.engine.storage import Storage

    counts = parse_workers(args.workers)
    if args.slots < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--slots, --threads: must be positive")
    with tempfile.TemporaryDirectory(prefix="facegen-bench-") as folder:
        spec = load_spec(args, Path(folder))
        if spec.max_slots < args.slots:
            spec = spec.model_copy(update={"filter": spec.filter.model_copy(update={"max_slots": args.slots})})
        out = Storage(str(Path(folder) / "out"))
        results, reference = [], None
        load_before = _loadavg()
        with ray_connection(args.address):
            resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            for workers in counts:
                seconds, plan, proposals = measure(spec, out, workers, args.slots, args.threads)
                reference = reference or proposals
                row = {**plan, "seconds": seconds, "candidates_per_s": args.slots / seconds,
                       "identical_to_baseline": same_proposals(proposals, reference),
                       "control_convolutions_per_s": control_rate(workers, plan["cpus_per_worker"],
                                                                  plan["threads_per_worker"])}
                results.append(row)
        base = results[0]
        for row in results:
            row["speedup"] = row["candidates_per_s"] / base["candidates_per_s"]
            row["efficiency"] = row["speedup"] / (row["workers"] / base["workers"])
            row["machine_speedup"] = row["control_convolutions_per_s"] / base["control_convolutions_per_s"]
            row["efficiency_vs_machine"] = row["speedup"] / row["machine_speedup"]
            print(format_row(row), flush=True)
    load = {"before": load_before, "after": _loadavg()}
    if args.address is None and max(load["before"], load["after"]) > (resources.get("CPU") or 1):
        print(f"note: this machine's load average ({load['before']:.1f} before, {load['after']:.1f} after) "
              "exceeds its CPUs: other processes took part of them, so the figures understate scaling")
    report = {"benchmark": "scaling", "job": args.job or "demo", "slots": args.slots, "cluster": resources,
              "machine": platform.processor() or platform.machine(), "load_average": load, "results": results}
    write_record(args.json, report)
    return 0 if all(r["identical_to_baseline"] for r in results) else 1


def _loadavg() -> float:
    """The 1-minute load average (0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def format_row(row: dict) -> str:
    device = f"{row['gpus_per_worker']:g} GPU" if row["gpus_per_worker"] else f"{row['cpus_per_worker']:g} CPU"
    same = "identical" if row["identical_to_baseline"] else "DIFFERENT proposals!"
    return (f"{row['workers']:>3} workers ({device}, {row['threads_per_worker']} threads each): "
            f"{row['candidates_per_s']:8.2f} candidates/s  speed-up x{row['speedup']:.2f}  "
            f"efficiency {row['efficiency']:.0%}  (machine x{row['machine_speedup']:.2f}, "
            f"vs machine {row['efficiency_vs_machine']:.0%})  ({same})")
