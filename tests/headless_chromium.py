"""Headless Chromium for tests, driven over the DevTools protocol on a pipe (--remote-debugging-pipe).

Chromium reads protocol commands from fd 3 and writes replies and events to fd 4, each message a
JSON object ended by a NUL byte: the transport Puppeteer and Playwright use, so no websocket client
and no extra package are needed. Every console error, uncaught exception and error log entry
(a failed load, a Content-Security-Policy violation) of the page is collected in `Page.errors`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SKIP_REASON = "chromium is not installed (Debian: apt-get install -y chromium)"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe"]


def _high(fd: int) -> int:
    """`fd` moved to a number >= 10 (close-on-exec, as os.pipe makes them); the old number is closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Page:
    """One tab: evaluate JS, take screenshots; `errors` holds what the page reported as errors."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries of this page so far."""
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                found.append(f"console.{params['type']}: {args}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
        return found

    def evaluate(self, expression: str) -> Any:
        """The value of a JS expression in the page (JSON-able values only)."""
        reply = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"JS failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, path: Path, width: int, height: int) -> Path:
        """A PNG of the whole page at the given viewport size."""
        self.browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                          self.session)
        shot = self.browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, self.session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Browser:
    """A headless Chromium process with a fresh profile; use as a context manager."""

    def __init__(self, timeout: float = 30.0) -> None:
        if CHROMIUM is None:
            raise RuntimeError(SKIP_REASON)
        self.timeout, self.events, self._buffer, self._next_id = timeout, [], b"", 0
        self._profile = tempfile.TemporaryDirectory(prefix="vaetool-chromium-")
        to_chromium, from_chromium = os.pipe(), os.pipe()  # (read, write) each
        theirs = (_high(to_chromium[0]), _high(from_chromium[1]))  # fds >= 10: clear of 0-4 whatever the process has open
        command = [CHROMIUM, *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"]
        # a small launcher puts them at fds 3 and 4 (no preexec_fn in a process that may hold threads)
        launcher = "import os, sys; r, w = map(int, sys.argv[1:3]); os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w); " \
                   "os.execv(sys.argv[3], sys.argv[3:])"
        self.process = subprocess.Popen([sys.executable, "-c", launcher, *map(str, theirs), *command], pass_fds=theirs,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in theirs:
            os.close(fd)
        self._write, self._read = to_chromium[1], from_chromium[0]

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ask Chromium to quit, kill it if it does not, and remove the profile."""
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):  # it may be gone already
            self.call("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._write, self._read):
            os.close(fd)
        self._profile.cleanup()

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("no message from chromium in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (already received or coming) for which `matches` is true."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if matches(event):
                    return event
            seen = len(self.events)
            self.events.append(self._receive(deadline))

    def open(self, url: str) -> Page:
        """A new tab with console, log and page events on, `url` loaded (its load event fired)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=session)
        before = len(self.events)
        self.call("Page.navigate", {"url": url}, session)
        self.wait_for(lambda e: e in self.events[before:] and e.get("sessionId") == session and e.get("method") == "Page.loadEventFired")
        page = Page(self, session)
        deadline = time.monotonic() + self.timeout
        while page.evaluate("document.readyState + ' ' + location.href") != f"complete {url}":  # not an earlier about:blank load
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load in time")
            time.sleep(0.05)
        return page
