"""The course in a real browser: JupyterLab driven by headless Chromium, and the built site.

Starts JupyterLab on 127.0.0.1 (a free port, a random token, temporary runtime, config,
settings and workspace folders) on a temporary copy of the notebooks, so nothing in the
repository changes, and drives Debian's Chromium with Playwright (Playwright cannot download
its own browsers here; it launches the system binary through ``executable_path``). Checks:

- an executed chapter's explorer renders as real widgets (not ``IntSlider(`` text or
  "Loading widget...") and moving its first slider changes its figure;
- an unexecuted notebook shows its stored figures;
- the site of ``mmcourse site`` shows figures and typeset formulas (MathJax output, no raw
  ``$$``) on its landing page and a chapter.

Screenshots go to ``$MMCOURSE_BROWSER_ARTIFACTS`` (CI uploads it) or to a temporary folder.
Marked ``browser``: skipped only where no Chromium binary is found (conftest.py).
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chapters whose explorer is checked, fastest first (about 13-18 s each on an idle 2-core
# CPU); 02's explorer reads a model trained in the notebook. Those without an explorer in
# this checkout are left out; at most three run.
EXPLORER_CHAPTERS = ("03", "02", "15", "00", "01")
MAX_EXPLORER_CHAPTERS = 3
RUN_TIMEOUT_S = 420  # one chapter's Run All on a loaded machine
MS = 1000


def find_chromium() -> str | None:
    """The Chromium binary: ``$MMCOURSE_CHROMIUM`` or the first known name on PATH."""
    explicit = os.environ.get("MMCOURSE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _notebook(key: str) -> Path:
    found = sorted((REPO / "notebooks").glob(f"{key}_*.ipynb"))
    assert found, f"no notebook for chapter {key}"
    return found[0]


def _has_explorer(path: Path) -> bool:
    """Whether a chapter's code builds ipywidgets controls."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return bool(
        re.search(r"\bwidgets\.(IntSlider|FloatSlider|explore|interactive)|\binteract", code)
    )


def explorer_chapters() -> list[str]:
    keys = [k for k in EXPLORER_CHAPTERS if list((REPO / "notebooks").glob(f"{k}_*.ipynb"))]
    return [k for k in keys if _has_explorer(_notebook(k))][:MAX_EXPLORER_CHAPTERS]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("MMCOURSE_BROWSER_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    assert executable, "conftest.py skips browser tests without Chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, artifacts, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        yield page
    finally:
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        try:
            page.screenshot(path=str(artifacts / f"{name}.png"), full_page=False)
        finally:
            context.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a process this test started, and its process group (its kernels)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    try:
        os.killpg(process.pid, 9)  # kernels it started, if any outlived it
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks: (base URL, token, notebook folder)."""
    root = tmp_path_factory.mktemp("lab")
    notebooks = root / "notebooks"
    notebooks.mkdir()
    for path in (REPO / "notebooks").glob("*.ipynb"):
        shutil.copy2(path, notebooks / path.name)
    settings = root / "settings"
    for plugin, values in {
        # Every cell in the DOM, so the test can wait on every prompt (the explorer is
        # still scrolled into view, as a learner would).
        "notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        package, name = plugin.split("/")
        folder = settings / "@jupyterlab" / package
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MMCOURSE_STATIC": "0",  # a live front end is attached: explorers show controls
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    log = open(root / "lab.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={notebooks}",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={root / 'workspaces'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",  # no PyPI queries
            *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}"
                    ) from None
                time.sleep(1)
        yield base, token, notebooks
    finally:
        _stop(process)
        log.close()


def _shutdown_kernels(lab) -> None:
    """Shut down every kernel of the server (so one test's kernel does not slow the next)."""
    base, token, _ = lab
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(
        urllib.request.Request(f"{base}/api/kernels", headers=headers)
    ) as r:
        kernels = json.load(r)
    for kernel in kernels:
        request = urllib.request.Request(
            f"{base}/api/kernels/{kernel['id']}", method="DELETE", headers=headers
        )
        urllib.request.urlopen(request, timeout=60).close()


@pytest.fixture
def lab_notebook(lab):
    """The server, with its kernels shut down after the test."""
    try:
        yield lab
    finally:
        _shutdown_kernels(lab)


def _open_notebook(page, lab, name: str) -> None:
    base, token, _ = lab
    # A fresh workspace (reset): only this notebook open, none restored from an earlier test.
    page.goto(f"{base}/lab/tree/{name}?token={token}&reset", timeout=120 * MS)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120 * MS)
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:  # the kernel starts by itself (autoStartDefaultKernel); if asked anyway, accept
        dialog.wait_for(state="visible", timeout=5 * MS)
        dialog.locator(".jp-mod-accept").click()
    except PlaywrightTimeout:
        pass


def _run_all(page) -> None:
    """Run > Run All Cells, then wait until no cell is queued or running."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-InputPrompt')]"
        ".some(p => p.textContent.includes('*'))",
        timeout=60 * MS,
    )
    page.wait_for_function(
        "() => ![...document.querySelectorAll('.jp-InputPrompt')]"
        ".some(p => p.textContent.includes('*'))",
        timeout=RUN_TIMEOUT_S * MS,
        polling=1000,
    )


def _cell_images(cell) -> list[str]:
    return cell.locator(".jp-OutputArea img").evaluate_all("els => els.map(e => e.src)")


@pytest.mark.parametrize("key", explorer_chapters())
def test_explorer_is_live_after_run_all(page, lab_notebook, key, artifacts):
    name = _notebook(key).name
    _open_notebook(page, lab_notebook, name)
    _run_all(page)
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
    assert errors.count() == 0, f"{name} raised: {errors.first.inner_text()[:2000]}"

    slider = page.locator(".jp-OutputArea .jupyter-widgets.widget-slider").first
    slider.wait_for(state="attached", timeout=60 * MS)
    slider.scroll_into_view_if_needed()
    slider.wait_for(state="visible", timeout=30 * MS)
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-slider")).first
    text = cell.locator(".jp-Cell-outputArea").first.inner_text()
    assert "IntSlider(" not in text and "Loading widget" not in text, text[:500]
    before = _cell_images(cell)
    assert before, f"{name}: the explorer's cell shows no figure"
    page.screenshot(path=str(artifacts / f"{key}_explorer_before.png"))

    handle = slider.locator(".noUi-handle").first
    handle.click()
    handle.press("ArrowRight")  # one step: one redraw
    page.wait_for_function(
        "([cell, before]) => { const now = [...cell.querySelectorAll('.jp-OutputArea img')]"
        ".map(e => e.src); return now.length > 0 && now.join('|') !== before.join('|'); }",
        arg=[cell.element_handle(), before],
        timeout=120 * MS,
    )
    after = _cell_images(cell)
    assert after != before
    page.screenshot(path=str(artifacts / f"{key}_explorer_after.png"))


def test_explorers_checked_in_at_least_two_chapters():
    found = explorer_chapters()
    assert "02" in found and "03" in found, found


def test_unexecuted_notebook_shows_its_stored_figures(page, lab_notebook):
    _open_notebook(page, lab_notebook, _notebook("02").name)
    images = page.locator(".jp-OutputArea-output img")
    images.first.wait_for(state="attached", timeout=60 * MS)
    assert images.count() >= 3
    first = images.first
    first.scroll_into_view_if_needed()
    first.wait_for(state="visible", timeout=30 * MS)
    widths = images.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert all(w > 0 for w in widths), widths


@pytest.fixture(scope="module")
def site_url(tmp_path_factory):
    """The built site served over HTTP on 127.0.0.1 (as GitHub Pages would serve it)."""
    from mmcourse.site import build_site

    folder = build_site(tmp_path_factory.mktemp("site") / "site")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no access log on stderr
        pass


def _loaded_image_widths(page) -> list[int]:
    return page.locator("article img").evaluate_all(
        "els => els.map(e => e.complete ? e.naturalWidth : 0)"
    )


def test_site_landing_page_and_a_chapter(page, site_url, artifacts):
    elsewhere = []  # every request the pages make outside the site (a CDN, fonts, ...)
    page.on("request", lambda r: None if r.url.startswith(site_url) else elsewhere.append(r.url))
    page.goto(f"{site_url}/index.html", timeout=60 * MS)
    links = page.locator('article a[href^="notebooks/"]')
    assert links.count() >= 10
    page.screenshot(path=str(artifacts / "site_index.png"))
    page.locator('article a[href="notebooks/02_attention.html"]').first.click()
    page.wait_for_url(re.compile(r"02_attention\.html"), timeout=60 * MS)
    page.wait_for_selector("mjx-container", state="attached", timeout=60 * MS)
    page.wait_for_load_state("load")
    assert page.locator("article mjx-container").count() > 10
    # The prose (code and its outputs left out): formulas typeset, no TeX source left.
    prose = page.evaluate(
        "() => { const a = document.querySelector('article').cloneNode(true);"
        " a.querySelectorAll('.cell_input, .cell_output, pre, code, mjx-container')"
        ".forEach(e => e.remove()); return a.textContent; }"
    )
    assert "Attention" in prose
    for tex in ("$$", "$", "\\frac", "\\sqrt", "\\("):
        assert tex not in prose, f"raw {tex!r} in the chapter's prose"
    widths = _loaded_image_widths(page)
    assert len(widths) >= 3 and all(w > 0 for w in widths), widths
    page.locator('article mjx-container[display="true"]').first.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "site_02_attention.png"))
    assert not [u for u in elsewhere if not u.startswith(("data:", "blob:"))], elsewhere
