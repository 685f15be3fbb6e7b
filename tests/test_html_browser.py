"""The HTML report in a real browser: headless Chromium opens ``report.html`` and the rendered DOM is checked
through the DevTools protocol (``--remote-debugging-pipe``; the page itself has no script): every finding is
there, no script element, every plot image decoded, markup injected through a log line is inert text.

Needs Debian's ``chromium`` (``/usr/bin/chromium``): ``.ci/run`` installs it; elsewhere the test skips when it is
missing (in CI, where ``CI`` is set, a missing browser is a failure).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from higgs_diag.api import analyze
from higgs_diag.report import write_reports

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "fixtures" / "runs" / "eval-loss-missing"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]
INJECTED = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\"><b>bold</b>"

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI is set but Chromium is missing: .ci/run installs Debian's chromium package")
    pytest.skip("Chromium not installed (apt-get install chromium): the browser test of the HTML report is skipped",
                allow_module_level=True)


class DevTools:
    """Chromium with the DevTools protocol on a pipe (fd 3: commands in, fd 4: replies out, NUL-terminated)."""

    def __init__(self, profile: Path):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def fds():  # in the child: the pipe ends at 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=fds, close_fds=False)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"no DevTools reply to {method}")
            ready, _, _ = select.select([self._from_r], [], [], left)
            if ready:
                chunk = os.read(self._from_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk

    def evaluate(self, session: str, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return res["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)


PAGE_FACTS = """JSON.stringify({
  title: document.title,
  scripts: document.getElementsByTagName('script').length,
  handlers: Array.from(document.querySelectorAll('*')).filter(e => Array.from(e.attributes).some(
      a => a.name.startsWith('on'))).length,
  foreign: document.querySelectorAll('iframe, object, embed, b, link[rel=import]').length,
  findings: Array.from(document.querySelectorAll('section.finding h3 code:first-of-type')).map(c => c.textContent),
  rows: document.querySelectorAll('table tbody tr td a code').length,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                                   h: i.naturalHeight})),
  text: document.body.innerText,
})"""


def test_report_html_renders_in_chromium(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    log = (f"Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\n"
           f"KeyError: \"The `metric_for_best_model` training argument is set to 'eval_loss{INJECTED}', which is "
           f"not found in the evaluation metrics.\"\n")
    (run / "train.log").write_text(log)
    diag = analyze(run)
    out = tmp_path / "report"
    written = write_reports(diag, out)
    plots = [k for k in written if k.startswith("plots/")]
    assert diag.findings and plots
    html_text = (out / "report.html").read_text()
    assert "<script" not in html_text.lower()

    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": (out / "report.html").as_uri()})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        end = time.monotonic() + 60
        ready = "location.protocol === 'file:' && document.readyState === 'complete'"
        while not browser.evaluate(session, ready):
            assert time.monotonic() < end, "report.html did not finish loading"
            time.sleep(0.1)
        facts = json.loads(browser.evaluate(session, PAGE_FACTS))
    finally:
        browser.close()

    assert facts["scripts"] == 0 and facts["handlers"] == 0 and facts["foreign"] == 0
    assert facts["title"].startswith("higgs-diag: ") and "pwned" not in facts["title"]
    assert facts["findings"] == [f.code for f in diag.findings]  # every finding, in order
    assert facts["rows"] == len(diag.findings)
    assert INJECTED in facts["text"]  # the injected markup is shown as text, inert
    assert len(facts["images"]) == len(plots)
    for img in facts["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
