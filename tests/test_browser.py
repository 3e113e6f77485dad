"""A notebook in a real JupyterLab, driven by headless Chromium (Debian's package) via Playwright.

The test copies the notebook to a temporary folder (JupyterLab saves what it runs), starts
JupyterLab on loopback, runs every cell from the Run menu, draws the interactive figure
("Run Interact"), moves the target-class slider, draws again and checks that the figure
changed. Screenshots go to ``$SAGKIT_SCREENSHOTS`` (default: pytest's
tmp_path). Without Chromium it is skipped, except in CI (``CI`` set), where it fails.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NOTEBOOK = "04_guided_sampling.ipynb"
WIDGET = "target"  # the description of the integer slider the test moves
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make browser` installs Debian's package")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    pytest.importorskip("playwright")
    work = tmp_path / "lab"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)
    port, token = _free_port(), "sagkit-browser-test"
    env = dict(os.environ, SAGKIT_FAST="1", JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={work}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "jupyterlab.log").read_text()) from None
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _draw(page, previous: str | None = None) -> str:
    """Click "Run Interact" and return the src of the figure in the widget's output once it
    differs from ``previous``."""
    page.get_by_role("button", name="Run Interact").click()
    page.wait_for_function(
        """previous => {
            const im = document.querySelector('.widget-output img');
            return im !== null && im.src !== previous;
        }""",
        arg=previous,
        timeout=180_000,
        polling=500,
    )
    return page.locator(".widget-output img").first.get_attribute("src")


def test_notebook_runs_and_widget_updates_figure(jupyterlab, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    shots = Path(os.environ.get("SAGKIT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60_000)

        # "Run All Cells" is a no-op until the kernel is connected: retry until a cell starts.
        for _ in range(10):
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
            try:
                page.wait_for_function(
                    """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                        .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))""",
                    timeout=15_000,
                    polling=500,
                )
                break
            except PlaywrightTimeout:
                continue
        # every code cell ends with an execution count and no cell is busy ("[*]")
        page.wait_for_function(
            """() => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""",
            timeout=300_000,
            polling=500,
        )
        errors = page.locator(
            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
        )
        tracebacks = [e for e in errors.all_inner_texts() if "Error" in e and "Traceback" in e]
        assert not tracebacks, tracebacks[0]

        interact = page.locator(".widget-interact")
        interact.scroll_into_view_if_needed()
        before = _draw(page)
        page.screenshot(path=str(shots / "browser_before.png"))
        slider = interact.locator(".widget-slider", has_text=WIDGET)
        readout = slider.locator(".widget-readout")
        old = int(readout.inner_text())
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(str((old + 2) % 10))
        page.keyboard.press("Enter")
        assert int(readout.inner_text()) == (old + 2) % 10
        after = _draw(page, before)
        page.screenshot(path=str(shots / "browser_after.png"))
        assert after != before
        browser.close()
