"""report.html in a real browser: Debian's chromium, headless (skipped, with the reason, where none is installed).

The page is built from a copy of the committed default results; chromium loads it from disk (no network), runs its
script, sorts a table through the page's `#sort=T,C` hook and dumps the DOM, which is read back here; its console
must stay free of errors (checked to catch one on a page with a deliberate error); and a screenshot is taken."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium here: `apt-get install chromium` (done by "
                                   "scripts/bootstrap.sh where apt-get is available and you are root, and by .ci/run)")


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", *args],
                          capture_output=True, text=True, timeout=timeout)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    from peft_bench.report.build import write_html

    out = tmp_path_factory.mktemp("html") / "default"
    shutil.copytree(ROOT / "results" / "default", out)
    return write_html(out)


def test_page_is_self_contained_with_definitions_and_one_table_per_workload(page):
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from the network
    workloads = {line.split(",")[1] for line in (page.parent / "metrics.csv").read_text().splitlines()[1:]}
    assert text.count('<table class="results">') == len(workloads)
    assert 'title="most bytes of live tensor storages' in text  # a metric's definition on its header
    assert text.count("data:image/png;base64,") == len(list(page.parent.glob("*.png")))


@needs_browser
def test_browser_runs_the_page_without_console_errors_and_sorts_a_column(page, tmp_path):
    col = 3  # tensor peak
    got = chromium("--dump-dom", f"file://{page}#sort=0,{col}")
    assert got.returncode == 0, got.stderr[-2000:]
    assert console_errors(got.stderr) == []
    dom = got.stdout
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    first = dom.split('<table class="results">')[1].split("</table>")[0]
    pattern = r'<tr[^>]*>(?:<td[^>]*>.*?</td>){' + str(col) + r'}<td data-v="([^"]+)"'
    values = [float(v) for v in re.findall(pattern, first)]
    assert len(values) > 2 and values == sorted(values)
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,1000", f"file://{page}")
    assert shot.stat().st_size > 20_000


@needs_browser
def test_the_console_check_catches_an_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><body><script>notDefinedAnywhere()</script></body></html>")
    got = chromium("--dump-dom", f"file://{bad}")
    assert console_errors(got.stderr)
