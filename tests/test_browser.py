"""A notebook in a real JupyterLab, driven by headless Chromium (Debian's package) via Playwright.

The notebook is a small one made from notebook 04: its first code cell (imports, the shipped
model and classifier) and its interactive figure's cell, exactly as they are there. The rest of
notebook 04 runs under nbval (``make notebooks-test``); what only a browser shows is that
JupyterLab runs a notebook and that the widget draws and redraws its figure.

The test writes that notebook to a temporary folder (JupyterLab saves what it runs), starts
JupyterLab on loopback with its own temporary settings, waits until the notebook's kernel is
connected, runs every cell from the Run menu, draws the interactive figure ("Run Interact"),
moves the target-class slider, draws again and checks that the figure changed. Screenshots go
to ``$SAGKIT_SCREENSHOTS`` (default: pytest's tmp_path); on a failure a screenshot of the page,
the JupyterLab server log and the browser console go there too, and the failure message gives
their paths. Without Chromium it is skipped, except in CI (``CI`` set), where it fails.

Why the test waits for the kernel: JupyterLab shows the notebook, and a "Kernel status: Idle"
indicator, before it has started the notebook's kernel. A "Run All" in that moment finds no
kernel, tries to start one while the notebook is still starting its own, fails, and opens the
"Select Kernel" dialog, which then covers the page and swallows every later click. The test
therefore (1) names a kernel that exists in the notebook's metadata, (2) tells JupyterLab to
start that kernel without asking, (3) waits until the server and the page both report the kernel
connected and idle, and (4) accepts the dialog with the notebook's kernel if it shows up anyway.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = "04_guided_sampling.ipynb"  # the notebook whose setup and widget cells are taken
NOTEBOOK = "browser_check.ipynb"  # the small notebook the test writes and opens
WIDGET = "target"  # the description of the integer slider the test moves
# The kernel the notebook runs on. Jupyter always provides "python3" for the Python that runs
# the server (here the test's own interpreter), so sagkit imports in the kernel.
KERNEL = "python3"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]

# JupyterLab settings for the test's temporary settings folder (one file per plugin, the same
# files JupyterLab writes when a user changes a setting).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {
        # Start the notebook's kernel instead of asking which one to start.
        "autoStartDefaultKernel": True,
        # Keep every cell in the page, so that the checks below see all of them.
        "windowingMode": "none",
    },
    # No pop-up asking about news or updates.
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

# True once the page shows the notebook's kernel as connected and idle. The status bar reads
# "Initializing", "Connecting" or "Unknown" until then; the toolbar indicator alone does not
# tell, because it reads "idle" for a moment before the kernel exists.
PAGE_KERNEL_IDLE = """() => {
    const indicator = document.querySelector(
        '.jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator');
    const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')]
        .find(e => (e.title || '').startsWith('Change kernel'));
    return indicator !== null && indicator.dataset.status === 'idle'
        && status !== undefined && /\\|\\s*Idle$/.test(status.textContent.trim());
}"""

# "started" once a code cell is queued, running or done; "dialog" when a dialog is open.
RUN_STARTED = """() => {
    if (document.querySelector('.jp-Dialog') !== null) return 'dialog';
    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
    return prompts.some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent)) ? 'started' : false;
}"""

# "done" once every code cell has an execution count, "stopped" when nothing runs any more but
# a traceback is shown (the run stops at the failing cell), "dialog" when a dialog is open.
RUN_FINISHED = """() => {
    if (document.querySelector('.jp-Dialog') !== null) return 'dialog';
    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
        .map(p => p.textContent);
    if (prompts.length > 0 && prompts.every(t => /\\[\\d+\\]/.test(t))) return 'done';
    const errors = [...document.querySelectorAll(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")];
    const traceback = errors.some(e => e.textContent.includes('Traceback'));
    return traceback && !prompts.some(t => t.includes('[*]')) ? 'stopped' : false;
}"""

# Accepts an open "Select Kernel" dialog with the given kernel; null when no dialog is open.
ACCEPT_KERNEL_DIALOG = """choice => {
    const dialog = document.querySelector('.jp-Dialog');
    if (dialog === null) return null;
    const title = dialog.querySelector('.jp-Dialog-header');
    const button = dialog.querySelector('button.jp-mod-accept');
    if (title === null || !title.textContent.includes('Select Kernel') || button === null) {
        return {accepted: false, text: dialog.innerText};
    }
    const select = dialog.querySelector('select');
    if (select !== null && [...select.options].some(o => o.value === choice)) select.value = choice;
    button.click();
    return {accepted: true, text: dialog.innerText};
}"""

pytestmark = pytest.mark.slow


@dataclass
class Lab:
    base: str
    token: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_notebook(work: Path) -> None:
    """Write the small notebook: notebook 04's first code cell and the cell of its interactive
    figure (the one calling ``interact_manual`` with the ``WIDGET`` slider), naming the kernel
    the test starts in its metadata: JupyterLab asks which kernel to start when the notebook
    names one that does not exist.

    The copy also shows any input the notebook collapses: JupyterLab replaces a collapsed
    cell's input by a placeholder whose prompt never shows the execution count, so the end of
    the run (every prompt numbered) could not be seen."""
    nb = json.loads((ROOT / "notebooks" / SOURCE).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    widget = [c for c in code if "interact_manual" in "".join(c["source"])]
    assert len(widget) == 1 and f'description="{WIDGET}"' in "".join(widget[0]["source"]), (
        f"{SOURCE} no longer has one interact_manual cell with a {WIDGET!r} slider"
    )
    nb["cells"] = [code[0], widget[0]]
    nb.setdefault("metadata", {})["kernelspec"] = {
        "name": KERNEL,
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    for cell in nb["cells"]:
        cell.get("metadata", {}).get("jupyter", {}).pop("source_hidden", None)
    (work / NOTEBOOK).write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")


def _write_settings(folder: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2), encoding="utf-8")


@pytest.fixture
def jupyterlab(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make browser` installs Debian's package")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    pytest.importorskip("playwright")
    work = tmp_path / "lab"
    work.mkdir()
    _copy_notebook(work)
    settings = tmp_path / "lab-settings"
    _write_settings(settings)
    port, token = _free_port(), "sagkit-browser-test"
    # Configuration and data folders of the test's own: nothing from the user's Jupyter setup
    # (settings, workspaces, extensions or kernels in the home folder) changes what runs.
    env = dict(
        os.environ,
        SAGKIT_FAST="1",
        JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
    )
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
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        f"--MappingKernelManager.default_kernel_name={KERNEL}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log_path = tmp_path / "jupyterlab.log"
    log = open(log_path, "w")
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
                    raise RuntimeError(log_path.read_text()) from None
                time.sleep(0.5)
        yield Lab(base, token, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _kernel_states(lab: Lab) -> list[tuple[str, str]]:
    """(kernel name, execution state) of the server's sessions for the notebook."""
    with urllib.request.urlopen(f"{lab.base}/api/sessions?token={lab.token}", timeout=5) as r:
        sessions = json.load(r)
    return [
        ((s.get("kernel") or {}).get("name"), (s.get("kernel") or {}).get("execution_state"))
        for s in sessions
        if Path(s.get("path") or "").name == NOTEBOOK
    ]


def _accept_kernel_dialog(page) -> bool:
    """Accept a "Select Kernel" dialog with the notebook's kernel; fail on any other dialog.
    Returns whether there was a dialog."""
    # This works in the page rather than through Playwright's locators: any locator call would
    # first run the test's dialog handler, which accepts this same dialog, and then wait for a
    # dialog that is gone.
    seen = page.evaluate(ACCEPT_KERNEL_DIALOG, json.dumps({"name": KERNEL}, separators=(",", ":")))
    if seen is None:
        return False
    if not seen["accepted"]:
        raise AssertionError(f"unexpected JupyterLab dialog: {seen['text']}")
    page.wait_for_function("() => document.querySelector('.jp-Dialog') === null", timeout=10_000)
    print("accepted a Select Kernel dialog")
    return True


def _wait_for_kernel(page, lab: Lab, timeout: float = 120) -> None:
    """Wait until the server has the notebook's kernel idle and the page shows it connected and
    idle, for a second in a row."""
    deadline = time.monotonic() + timeout
    ready_since = None
    while True:
        _accept_kernel_dialog(page)
        states = _kernel_states(lab)
        ready = (KERNEL, "idle") in states and page.evaluate(PAGE_KERNEL_IDLE)
        if not ready:
            ready_since = None
        elif ready_since is None:
            ready_since = time.monotonic()
        elif time.monotonic() - ready_since >= 1.0:
            return
        if time.monotonic() > deadline:
            status = page.locator(
                ".jp-StatusBar-TextItem[title^='Change kernel']"
            ).all_inner_texts()
            raise AssertionError(
                f"the kernel is not connected after {timeout:.0f} s: "
                f"server sessions {states}, status bar {status}"
            )
        page.wait_for_timeout(250)


def _run_all(page, lab: Lab, attempts: int = 4) -> None:
    """Run every cell from the Run menu and return once a cell has started.

    With the kernel connected one click is enough. The retries are a fallback: JupyterLab
    ignores "Run All" while it has no kernel, and a "Select Kernel" dialog accepted during the
    run lets the run carry on, so a retry first waits for a started cell or the kernel."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(1, attempts + 1):
        _accept_kernel_dialog(page)
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
        for _ in range(3):
            try:
                state = page.wait_for_function(RUN_STARTED, timeout=20_000, polling=250)
            except PlaywrightTimeout:  # nothing started
                break
            if state.json_value() == "started":
                return
            _accept_kernel_dialog(page)
        print(f"Run All started no cell (attempt {attempt} of {attempts})")
        _wait_for_kernel(page, lab)
    raise AssertionError(f"Run All started no cell in {attempts} attempts")


def _draw(page, interact, previous: str | None = None) -> str:
    """Click "Run Interact" and return the src of the figure in the widget's output once it
    differs from ``previous``."""
    interact.get_by_role("button", name="Run Interact").click()
    image = ".widget-interact .widget-output img"
    page.wait_for_function(
        """([selector, previous]) => {
            const im = document.querySelector(selector);
            return im !== null && im.src !== previous;
        }""",
        arg=[image, previous],
        timeout=180_000,
        polling=500,
    )
    return page.locator(image).first.get_attribute("src")


def _check_notebook(page, lab: Lab, shots: Path) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lab.base}/lab/tree/{NOTEBOOK}?token={lab.token}")
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    _wait_for_kernel(page, lab)
    _run_all(page, lab)

    finished = page.wait_for_function(RUN_FINISHED, timeout=300_000, polling=500).json_value()
    if finished == "dialog":
        _accept_kernel_dialog(page)  # fails with the text of any other dialog
        raise AssertionError("a Select Kernel dialog opened while the notebook ran")
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [e for e in errors.all_inner_texts() if "Error" in e and "Traceback" in e]
    assert not tracebacks, tracebacks[0]
    assert finished == "done", "the run stopped before the last cell"

    interact = page.locator(".widget-interact")
    interact.scroll_into_view_if_needed()
    before = _draw(page, interact)
    page.screenshot(path=str(shots / "browser_before.png"))
    readout = interact.locator(".widget-slider", has_text=WIDGET).locator(".widget-readout")
    new = (int(readout.inner_text()) + 2) % 10
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(new))
    page.keyboard.press("Enter")
    expect(readout).to_have_text(str(new))
    after = _draw(page, interact, before)
    page.screenshot(path=str(shots / "browser_after.png"))
    assert after != before


def _save_failure(page, lab: Lab, console: list[str], shots: Path, exc: BaseException) -> None:
    """Save a screenshot, the server log and the browser console next to the screenshots and
    add their paths to the failure message."""
    saved = []
    if page is not None:
        png = shots / "browser_failure.png"
        try:
            page.screenshot(path=str(png), timeout=15_000)
            saved.append(f"screenshot:      {png}")
        except Exception as err:
            saved.append(f"screenshot:      not taken ({err})")
    log = shots / "jupyterlab.log"
    if log.resolve() != lab.log.resolve():
        shutil.copyfile(lab.log, log)
    saved.append(f"JupyterLab log:  {log}")
    console_log = shots / "browser_console.log"
    console_log.write_text("\n".join(console) + "\n", encoding="utf-8")
    saved.append(f"browser console: {console_log}")
    note = "Saved for this failure:\n  " + "\n  ".join(saved)
    print(note)
    if hasattr(exc, "add_note"):  # Python 3.11 and later: shown in the failure message
        exc.add_note(note)


def test_notebook_runs_and_widget_updates_figure(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

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
    console: list[str] = []
    page = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
            page.on("pageerror", lambda e: console.append(f"[page error] {e}"))
            # Should a "Select Kernel" dialog cover the page before a click, accept it first.
            page.add_locator_handler(
                page.locator(
                    ".jp-Dialog", has=page.locator(".jp-Dialog-header", has_text="Select Kernel")
                ),
                lambda dialog: _accept_kernel_dialog(page),
            )
            _check_notebook(page, jupyterlab, shots)
        except Exception as exc:
            _save_failure(page, jupyterlab, console, shots, exc)
            raise
        finally:
            browser.close()
