"""The report page in a real browser (Debian's headless Chromium): it loads from disk with no request to the network
and every plot is drawn. Chromium's network log tells the page's own requests (initiator: the page) from the
browser's background ones (initiator: "not an origin"); a control page with one remote image proves the check sees
a page's request."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import whisper_batch_ok
from tests.report_data import make_run
from whisper_batch.jobs.plots import PLOT_IDS

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run")


def chromium(page: Path, profile: Path, *args: str) -> str:
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def page_requests(page: Path, tmp_path: Path) -> tuple[list[str], str]:
    """URLs the page itself asked the network for, and its DOM after loading."""
    netlog = tmp_path / f"{page.stem}.netlog.json"
    dom = chromium(page, tmp_path / f"profile-{page.stem}", f"--log-net-log={netlog}", "--dump-dom")
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = [e["params"]["url"] for e in log["events"] if e["type"] == start and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin"]
    return urls, dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_report_loads_offline_with_every_plot(tmp_path):
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    urls, _ = page_requests(control, tmp_path)
    assert urls == ["http://127.0.0.1:9/x.png"], urls  # the check sees a page's request

    make_run(str(tmp_path / "run"), n_rows=90, shard_size=10, invocations=2)
    page = tmp_path / "report.html"
    whisper_batch_ok("report", tmp_path / "run", "--by", "dataset", "-o", page)
    urls, dom = page_requests(page, tmp_path)
    assert urls == [], urls
    figures = dict(re.findall(r'<figure class="plot" id="plot-([^"]+)">(.*?)</figure>', dom, re.S))
    assert set(figures) == {*PLOT_IDS, "by-dataset-rows", "by-dataset-hours"}, sorted(figures)
    for plot_id, body in figures.items():
        assert "<svg" in body and len(re.findall(r'<rect class="bar"', body)) >= 2, plot_id

    shot = Path(os.environ.get("WB_REPORT_SCREENSHOT") or tmp_path / "report.png")
    chromium(page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1360,4400",
             "--hide-scrollbars")
    png = shot.read_bytes()
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (1360, 4400)
    assert len(png) > 100_000  # bars, text and tables drawn, not a blank page
