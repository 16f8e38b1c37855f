"""Submit generation jobs to a Ray cluster through the Ray Jobs API, and follow them.

The job's resolved spec travels as the job's working directory (`job.yaml`); the entrypoint is
`facegen generate job.yaml --executor ray`, whose driver runs on the head node and joins the cluster
through the `RAY_ADDRESS` the job supervisor sets. Requests carry Ray's token (`Authorization:
Bearer …`) when one is found: `token=` argument, else `RAY_AUTH_TOKEN`, else the file named by
`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (where `ray start` / `ray get-auth-token` keep it).
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from facegen.engine.spec import JobSpec, spec_to_yaml
from facegen.models.errors import UserError

JOB_FILE = "job.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_token(token: str | None = None) -> str | None:
    """Ray's auth token for HTTP requests, from the places Ray itself looks (see module doc)."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def dashboard_url(address: str | None) -> str:
    """`http://HOST:PORT` of the cluster's dashboard (a bare HOST:PORT gets http://)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: give the Ray dashboard address, e.g. --address http://HEAD:8265 "
                        "(or set RAY_API_SERVER_ADDRESS)")
    return address if "://" in address else f"http://{address}"


def client(address: str | None, token: str | None = None):
    """A JobSubmissionClient for the cluster, authenticated when a token is available."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    found = resolve_token(token)
    headers = {"Authorization": f"Bearer {found}"} if found else {}
    try:
        return JobSubmissionClient(url, headers=headers)
    except ConnectionError as err:
        raise UserError(f"--address {url}: no Ray dashboard answers there ({err})") from None
    except Exception as err:  # AuthenticationError and friends
        raise UserError(_explain(url, err)) from None


def _explain(url: str, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if type(err).__name__ == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
        return (f"--address {url}: the cluster refused the request ({text}); pass --token, or set "
                "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head)")
    if "404" in text or "does not exist" in text:
        return f"{url}: {text}"
    return f"--address {url}: {text}"


def _call(url: str, method, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except ConnectionError as err:
        raise UserError(f"--address {url}: no Ray dashboard answers there ({err})") from None
    except Exception as err:
        raise UserError(_explain(url, err)) from None


def entrypoint(resume: bool) -> str:
    command = ["facegen", "generate", JOB_FILE, "--executor", "ray"] + (["--resume"] if resume else [])
    return shlex.join(command)


def submit(address: str | None, spec: JobSpec, *, resume: bool = False, submission_id: str | None = None,
           token: str | None = None, runtime_env: dict | None = None) -> str:
    """Submit the job; returns its submission id. The spec runs as given, on the cluster's Ray."""
    run = spec.run.model_copy(update={"executor": "ray", "address": None})
    spec = spec.model_copy(update={"run": run})
    jobs = client(address, token)
    with tempfile.TemporaryDirectory(prefix="facegen-submit-") as folder:
        Path(folder, JOB_FILE).write_text(spec_to_yaml(spec))
        env = {**(runtime_env or {}), "working_dir": folder}
        return _call(jobs.get_address(), jobs.submit_job, entrypoint=entrypoint(resume), runtime_env=env,
                     submission_id=submission_id,
                     metadata={"facegen.job": spec.name, "facegen.output": spec.output.uri})


def status(address: str | None, job_id: str, token: str | None = None) -> dict:
    """{'job_id', 'status', 'message', 'entrypoint', 'start_time', 'end_time'} of a submitted job."""
    jobs = client(address, token)
    info = _call(jobs.get_address(), jobs.get_job_info, job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time}


def logs(address: str | None, job_id: str, token: str | None = None) -> str:
    jobs = client(address, token)
    return _call(jobs.get_address(), jobs.get_job_logs, job_id)


def follow(address: str | None, job_id: str, token: str | None = None, poll_s: float = 1.0,
           timeout_s: float | None = None) -> Iterator[str]:
    """Yield new log text until the job ends (polling; works through proxies that drop websockets)."""
    jobs = client(address, token)
    url, seen = jobs.get_address(), 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = str(_call(url, jobs.get_job_status, job_id).value)
        text = _call(url, jobs.get_job_logs, job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if state in TERMINAL:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s}s")
        time.sleep(poll_s)


def wait(address: str | None, job_id: str, token: str | None = None, timeout_s: float = 3600,
         poll_s: float = 1.0) -> str:
    """Block until the job is terminal; returns its final status."""
    jobs = client(address, token)
    url, deadline = jobs.get_address(), time.monotonic() + timeout_s
    while True:
        state = str(_call(url, jobs.get_job_status, job_id).value)
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s}s")
        time.sleep(poll_s)


def stop(address: str | None, job_id: str, token: str | None = None) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    jobs = client(address, token)
    return bool(_call(jobs.get_address(), jobs.stop_job, job_id))
