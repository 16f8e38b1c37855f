"""`facegen submit | status | logs | stop`: generation jobs on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse
import json
import sys


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--token", help="Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                                   "~/.ray/auth_token)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit", help="submit a generation job to a Ray cluster (Ray Jobs API)",
        description=("Validate JOB.yaml here, then run `facegen generate` on the cluster: the resolved spec "
                     "travels with the job; model, index and output URIs must be reachable from the cluster "
                     "(shared file system or object storage). Prints the job id."))
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key (repeatable)")
    p.add_argument("--out", help="dataset location (overrides output.uri)")
    p.add_argument("--resume", action="store_true", help="continue the job already in the output location")
    p.add_argument("--job-id", help="submission id (default: chosen by Ray)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit 0 if it succeeded")
    _connection(p)
    p.set_defaults(func=run_submit)

    for name, helptext, func in (("status", "state of a submitted job", run_status),
                                 ("logs", "logs of a submitted job", run_logs),
                                 ("stop", "stop a submitted job", run_stop)):
        q = subparsers.add_parser(name, help=helptext, description=helptext)
        q.add_argument("job_id", help="the id `facegen submit` printed")
        _connection(q)
        if name == "status":
            q.add_argument("--json", action="store_true", help="print the whole status as JSON")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        q.set_defaults(func=func)


def run_submit(args: argparse.Namespace) -> int:
    from facegen.cluster import jobs_api

    overrides = list(args.overrides) + ([f"output.uri={json.dumps(args.out)}"] if args.out else [])
    from facegen.engine.spec import build_spec, load_spec_file

    spec = build_spec(load_spec_file(args.job), overrides)
    job_id = jobs_api.submit(args.address, spec, resume=args.resume, submission_id=args.job_id, token=args.token)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    for text in jobs_api.follow(args.address, job_id, args.token):
        sys.stdout.write(text)
        sys.stdout.flush()
    final = jobs_api.status(args.address, job_id, args.token)
    print(f"{job_id}: {final['status']}", file=sys.stderr)
    return 0 if final["status"] == "SUCCEEDED" else 1


def run_status(args: argparse.Namespace) -> int:
    from facegen.cluster import jobs_api

    info = jobs_api.status(args.address, args.job_id, args.token)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from facegen.cluster import jobs_api

    if not args.follow:
        sys.stdout.write(jobs_api.logs(args.address, args.job_id, args.token))
        return 0
    for text in jobs_api.follow(args.address, args.job_id, args.token):
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from facegen.cluster import jobs_api

    stopped = jobs_api.stop(args.address, args.job_id, args.token)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already ended'}")
    return 0
