"""Open a page in a real headless Chromium over the DevTools protocol (`--remote-debugging-pipe`) and
report what a person would see: console errors, uncaught exceptions, every image's decoded size, a
screenshot. Test-only; Debian's `chromium` package (`.ci/run` installs it)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

IMAGES_JS = ("JSON.stringify(Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, "
             "height: i.naturalHeight, data: i.src.startsWith('data:')})))")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class PageResult:
    images: list[dict]
    screenshot: bytes
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    title: str = ""


class _Pipe:
    """DevTools messages: NUL-terminated JSON, commands on the browser's fd 3, replies on its fd 4."""

    def __init__(self, binary: str, profile: str):
        to_browser_r, self._write = os.pipe()
        self._read, from_browser_w = os.pipe()

        def child_fds():
            high_r, high_w = os.dup(to_browser_r), os.dup(from_browser_w)  # above 4: no clobbering below
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={profile}",
                "--window-size=1280,1600"]
        # close_fds=False: subprocess closes every descriptor not in pass_fds *after* preexec_fn, which
        # would close 3 and 4 again; our other pipe ends are non-inheritable (PEP 446) and close on exec.
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=child_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.time() > deadline:
                raise TimeoutError("no answer from the browser")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing is best effort; the process is waited for below
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


def open_page(url: str, binary: str | None = None) -> PageResult:
    binary = binary or find_chromium()
    if not binary:
        raise FileNotFoundError("no chromium binary")
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired")
            images = json.loads(pipe.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True},
                                          session=session)["result"]["value"])
            title = pipe.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                              session=session)["result"]["value"]
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                             session=session)["data"]
            errors = _errors(pipe.events)
        finally:
            pipe.close()
    return PageResult(images, base64.b64decode(shot), errors, title)


def _errors(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return found
