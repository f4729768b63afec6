"""A dependency-free headless Chromium driver for tests: the DevTools protocol over --remote-debugging-pipe.

Chromium reads NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4. `open_page`
loads one URL, then lets a test evaluate JavaScript, take a screenshot, and read what the page reported:
uncaught exceptions, console errors/warnings, log errors, and every URL it requested.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1400, 3000)
TIMEOUT_S = 30.0
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]
CHILD_IN_FD, CHILD_OUT_FD = 3, 4


class BrowserError(RuntimeError):
    pass


@dataclass
class PageProblems:
    """What a page reported while it was open."""

    exceptions: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    requested_urls: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return self.exceptions + self.console_errors + self.log_errors


class DevToolsPipe:
    def __init__(self, process: subprocess.Popen, write_fd: int, read_fd: int):
        self.process, self.write_fd, self.read_fd = process, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session_id: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        reply = self.wait_for(lambda m: m.get("id") == self.next_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, predicate, timeout_s: float = TIMEOUT_S) -> dict:
        """Read messages (keeping events) until one satisfies predicate."""
        for message in self.events:
            if "id" not in message and predicate(message):
                return message
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" not in message:
                    self.events.append(message)
                if predicate(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise BrowserError(f"no answer from Chromium within {timeout_s:.0f} s")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed the pipe (exit {self.process.poll()})")
            self.buffer += chunk


@dataclass
class Page:
    pipe: DevToolsPipe
    session_id: str

    def evaluate(self, expression: str):
        result = self.pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                     "awaitPromise": True}, self.session_id)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        result = self.pipe.send("Page.captureScreenshot", {"format": "png"}, self.session_id)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    def problems(self) -> PageProblems:
        found = PageProblems()
        for event in self.pipe.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                found.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.log_errors.append(params["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                found.requested_urls.append(params["request"]["url"])
        return found


def _launch(profile: Path) -> DevToolsPipe:
    to_child_read, to_child_write = os.pipe()
    from_child_read, from_child_write = os.pipe()

    def wire_fds() -> None:
        # Runs in the child before exec: the pipe ends become fds 3 and 4 (moved above 4 first, so
        # one dup2 cannot overwrite the other). Every other fd Python opened is close-on-exec.
        child_in = fcntl.fcntl(to_child_read, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_child_write, fcntl.F_DUPFD, 10)
        os.dup2(child_in, CHILD_IN_FD)
        os.dup2(child_out, CHILD_OUT_FD)

    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               "about:blank"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=wire_fds)
    os.close(to_child_read)
    os.close(from_child_write)
    return DevToolsPipe(process, to_child_write, from_child_read)


def _close(pipe: DevToolsPipe) -> None:
    try:
        pipe.send("Browser.close")
    except (BrowserError, OSError):
        pass
    try:
        pipe.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pipe.process.kill()
        pipe.process.wait()
    os.close(pipe.write_fd)
    os.close(pipe.read_fd)


@contextmanager
def open_page(url: str) -> Iterator[Page]:
    """Load url in a fresh headless Chromium (own throw-away profile) and yield the loaded page."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    pipe = _launch(profile)
    try:
        target = next(t for t in pipe.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = pipe.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", {}, session)
        pipe.send("Emulation.setDeviceMetricsOverride", {"width": WINDOW[0], "height": WINDOW[1],
                                                         "deviceScaleFactor": 1, "mobile": False}, session)
        pipe.send("Page.navigate", {"url": url}, session)
        pipe.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        yield Page(pipe, session)
    finally:
        _close(pipe)
        shutil.rmtree(profile, ignore_errors=True)
