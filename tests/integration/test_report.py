"""`fullscale report` on real tiny runs, opened in headless Chromium: every plot must render.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on
fd 3, replies on fd 4, NUL-separated JSON), so the test needs no Python package beyond the
standard library. It skips only where no Chromium is installed (Debian: apt-get install -y chromium).
"""

import base64
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fullscale import faults
from fullscale.cli import main
from fullscale.train import train

PLOTS = ["loss", "learning_rate", "grad_norm", "tokens_per_second", "memory"]


# ----------------------------------------------------------------------------- headless Chromium

def find_chromium() -> str | None:
    for name in (os.environ.get("FULLSCALE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, executable: str, profile: Path, *, timeout: float = 60.0):
        self.timeout = timeout
        self.log = profile / "chromium.log"
        to_chrome, self._send_fd = os.pipe()
        self._recv_fd, from_chrome = os.pipe()
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        # Chromium expects the pipe on fds 3 and 4; go through high fds in case ours are 3 or 4.
        fds = (f"exec 100<&{to_chrome} 101>&{from_chrome} {to_chrome}<&- {from_chrome}>&-; "
               "exec 3<&100 4>&101 100<&- 101>&-; exec \"$@\"")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", fds, "bash", *args], pass_fds=(to_chrome, from_chrome),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, *, session: str | None = None) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, *, session: str) -> dict:
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            self.events.append(self._receive())

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                raise TimeoutError(f"no reply from Chromium in {self.timeout:.0f}s; its log:\n{self.log.read_text()}")
            chunk = os.read(self._recv_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its pipe; its log:\n{self.log.read_text()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._send_fd)
        os.close(self._recv_fd)


# Runs in the page: for each plot, its size on the page and what it draws (decoded, then drawn on a
# canvas: "ink" counts non-white pixels, "colored" counts pixels of the colored curves and markers).
CHECK_PLOTS = """(async () => {
  const out = [];
  for (const fig of document.querySelectorAll('figure.plot')) {
    const img = fig.querySelector('img');
    if (!img) { out.push({id: fig.id, error: 'no img'}); continue; }
    let error = null;
    await img.decode().catch(e => { error = String(e); });
    const box = img.getBoundingClientRect();
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    let ink = 0, colored = 0;
    if (canvas.width && canvas.height) {
      const ctx = canvas.getContext('2d');
      ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < d.length; i += 4) {
        const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
        if (lo < 245) ink++;
        if (hi - lo > 60) colored++;
      }
    }
    out.push({id: fig.id, error, complete: img.complete, naturalWidth: img.naturalWidth,
              naturalHeight: img.naturalHeight, width: box.width, height: box.height, ink, colored});
  }
  return out;
})()"""


def open_in_chromium(browser: Chromium, html_file: Path, screenshot: Path) -> tuple[list[dict], list[str], list[str]]:
    """Load the report, check its plots, take a full-page screenshot.
    Returns (plots, console errors, URLs requested)."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        viewport = {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
        browser.send("Emulation.setDeviceMetricsOverride", viewport, session=session)
        browser.send("Page.navigate", {"url": html_file.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session=session)
        plots = browser.send("Runtime.evaluate", {"expression": CHECK_PLOTS, "awaitPromise": True,
                                                  "returnByValue": True}, session=session)["result"]["value"]
        height = browser.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                   "returnByValue": True}, session=session)["result"]["value"]
        viewport["height"] = min(int(height), 16000)
        browser.send("Emulation.setDeviceMetricsOverride", viewport, session=session)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.send("Target.closeTarget", {"targetId": target})
    mine = [e for e in browser.events if e.get("sessionId") == session]
    errors = [json.dumps(e["params"])[:500] for e in mine
              if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    urls = [e["params"]["request"]["url"] for e in mine if e["method"] == "Network.requestWillBeSent"]
    return plots, errors, urls


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A started Chromium, or None where none is installed (the test then checks the HTML only,
    and skips at the point where it needs the browser)."""
    executable = find_chromium()
    if executable is None:
        yield None
        return
    chromium = Chromium(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def require(browser: Chromium | None) -> Chromium:
    if browser is None:
        pytest.skip("Chromium not found (looked for chromium, chromium-browser, google-chrome and "
                    "$FULLSCALE_CHROMIUM); install it with: apt-get install -y chromium")
    return browser


# ----------------------------------------------------------------------------- helpers

def svgs(html: str) -> dict[str, str]:
    """Each plot's SVG, by plot id."""
    found = re.findall(r'<figure class="plot" id="plot-([a-z_]+)"><img alt="[^"]*" src="data:image/svg\+xml;base64,'
                       r'([^"]+)"', html)
    return {pid: base64.b64decode(data).decode() for pid, data in found}


def texts(svg: str) -> list[str]:
    """The strings drawn in a matplotlib SVG (glyphs are paths; each text keeps its string in a comment)."""
    return re.findall(r"<!-- (.*?) -->", svg)


def assert_self_contained(html: str) -> None:
    assert "<script" not in html.lower()
    outside = re.sub(r'src="data:[^"]*"', "", html)
    assert not re.search(r'(src|href)\s*=\s*"(?!#)', outside), "the report loads something from outside itself"
    assert not re.search(r"@import|url\(", outside)


def assert_rendered(plots: list[dict], errors: list[str], urls: list[str], *, colored: set[str]) -> None:
    assert [p["id"] for p in plots] == [f"plot-{pid}" for pid in PLOTS]
    for p in plots:
        assert p["error"] is None and p["complete"], p
        assert p["naturalWidth"] >= 400 and p["naturalHeight"] >= 200, p
        assert p["width"] >= 400 and p["height"] >= 200, p          # shown at a readable size
        assert p["ink"] > 0.02 * p["naturalWidth"] * p["naturalHeight"], p   # axes, ticks, text drawn
        if p["id"].removeprefix("plot-") in colored:
            assert p["colored"] > 100, p                              # and a curve in color
    assert errors == []
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls


# ----------------------------------------------------------------------------- tests

def test_report_of_a_resumed_run_with_health_events_renders_every_plot(make_config, monkeypatch, browser, capsys):
    import fullscale.train as train_module

    config = make_config(max_steps=12, eval_steps=3, save_steps=3)

    class StopAfterStep5(train_module.PreemptionFlag):
        def agreed(self, accelerator, device):
            return faults.current_step >= 5   # as if SIGTERM arrived during step 5

    with monkeypatch.context() as m:
        m.setattr(train_module, "PreemptionFlag", StopAfterStep5)
        assert train(config)["stop_reason"] == "preempted"
    assert train(config)["stop_reason"] == "max_steps"   # resumes from checkpoint-5
    run = Path(config.output_dir)
    with open(run / "metrics.jsonl", "a") as fh:
        for step, detector, action, value in ((8, "spike", "rollback", 9.5), (10, "nonfinite", "skip", "nan")):
            fh.write(json.dumps({"event": "health", "step": step, "time": time.time(), "detector": detector,
                                 "action": action, "message": f"{detector} at step {step}", "value": value}) + "\n")

    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    html = out.read_text()
    assert_self_contained(html)
    plots = svgs(html)
    assert list(plots) == PLOTS
    for pid, svg in plots.items():
        labels = texts(svg)
        assert "resume @5" in labels and "spike/rollback" in labels and "nonfinite/skip" in labels, (pid, labels)
        assert "resume" in labels and "health event" in labels       # legend entries
    loss_labels = texts(plots["loss"])
    assert "eval" in loss_labels and any(t.startswith("best eval ") for t in loss_labels)
    for expected in ("finished (max_steps", "checkpoint-12", "best_model/", "<code>learning_rate</code>",
                     "<code>stop_reason</code>", "spike at step 8", "<h3>Resumes</h3>", "preempted"):
        assert expected in html, expected

    shot = run.parent / "report.png"
    rendered, errors, urls = open_in_chromium(require(browser), out, shot)
    assert_rendered(rendered, errors, urls, colored=set(PLOTS))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_report_of_a_run_still_going_without_evaluation(make_config, browser, tmp_path, capsys):
    config = make_config(max_steps=6, eval_split=0, eval_steps=0, save_steps=3)
    train(config)
    run = Path(config.output_dir)
    # Make it look like a run caught mid-way: no result yet, a live writer, a half-written last
    # line, and a last logged step whose loss is not finite.
    (run / "training_result.json").unlink()
    status = json.loads((run / "status.json").read_text())
    status.update(phase="running", pid=os.getpid(), updated=time.time(), total_steps=20, stop_reason=None,
                  eta_seconds=30.0)
    (run / "status.json").write_text(json.dumps(status))
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"train_end"' not in line]
    last = json.loads([line for line in lines if '"event": "train"' in line][-1])
    last.update(step=7, loss="nan", step_losses=["nan"], time=time.time())
    lines += [json.dumps(last), '{"event": "train", "step": 8, "lo']
    (run / "metrics.jsonl").write_text("\n".join(lines))

    out = tmp_path / "elsewhere" / "my-report.html"
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert not (run / "report.html").exists()
    html = out.read_text()
    assert_self_contained(html)
    assert "running (pid" in html and "No training_result.json yet" in html and "No health events" in html
    plots = svgs(html)
    loss_labels = texts(plots["loss"])
    assert "eval" not in loss_labels and "non-finite (1)" in loss_labels
    assert "20" in texts(plots["learning_rate"])   # the x axis spans the planned steps of a running run

    rendered, errors, urls = open_in_chromium(require(browser), out, tmp_path / "report.png")
    assert_rendered(rendered, errors, urls, colored=set(PLOTS))


def test_report_of_a_directory_that_is_not_a_run_is_one_clear_paragraph(tmp_path, capsys):
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a fullscale run directory" in err and "Traceback" not in err


def test_samples_at_each_evaluation_reach_the_console_metrics_tensorboard_and_the_report(make_config, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(max_steps=6, eval_steps=3, save_steps=3, eval_samples=2, report_to="tensorboard")
    capsys.readouterr()
    train(config)
    out = capsys.readouterr().out
    run = Path(config.output_dir)
    samples = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"sample"' in line]
    # Evaluations at steps 0, 3 and 6; the same two fixed eval rows each time, prompts as trained.
    assert [s["step"] for s in samples] == [0, 0, 3, 3, 6, 6]
    assert len({s["row"] for s in samples}) == 2 and all(s["prompt"].startswith("rev ") for s in samples)
    assert all(s["expected"] == s["prompt"][4:-1][::-1] for s in samples)   # the reverse task's answer
    assert out.count("  sample (eval row ") == 6
    events = EventAccumulator(str(run / "runs"), size_guidance={"tensors": 0}).Reload()
    assert any(tag.startswith("samples") for tag in events.Tags()["tensors"])
    capsys.readouterr()
    assert main(["report", str(run), "--log-loss"]) == 0
    html = (run / "report.html").read_text()
    assert "<h2>Sample generations</h2>" in html and html.count("<td>rev ") == 4   # the first and last evaluation
    assert "eval loss (log scale)" in html
    chosen = html.index("<h3>Set for this run")
    assert chosen < html.index("<code>max_steps</code>") < html.index("defaults (")
    assert html.index("defaults (") < html.index("<code>weight_decay</code>")   # a default, folded below


def test_a_run_whose_best_evaluation_stays_at_step_0_says_why_in_the_report(make_config, capsys):
    config = make_config(max_steps=4, eval_steps=2, save_steps=2, early_stopping_min_delta=100.0)
    result = train(config)
    assert result["best_step"] == 0
    capsys.readouterr()
    assert main(["report", config.output_dir]) == 0
    html = (Path(config.output_dir) / "report.html").read_text()
    assert "still the one at step 0" in html and "gives the base model back" in html


def test_a_run_that_improved_has_no_step_0_note(make_config, capsys):
    config = make_config(max_steps=4, eval_steps=2, save_steps=2)
    assert train(config)["best_step"] != 0
    capsys.readouterr()
    assert main(["report", config.output_dir]) == 0
    assert "still the one at step 0" not in (Path(config.output_dir) / "report.html").read_text()
