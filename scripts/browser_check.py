#!/usr/bin/env python
"""Check the lab in a real browser: start JupyterLab, open a notebook in Chromium (driven by Playwright), run
every cell, drag a slider of the simulator playground, and check that its plot was redrawn with new data.

    .venv/bin/python scripts/browser_check.py --out out/browser-check.png       # or: make browser-check

Uses Debian's chromium (apt-get install -y chromium), not a browser downloaded by Playwright. The notebook runs
in smoke mode (PAGEDLAB_SMOKE=1). Exits non-zero, with the reason, if any step fails; the screenshot is written
either way when the page got that far.
"""
import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/lib/chromium/chromium"     # the real binary; /usr/bin/chromium is a wrapper script
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
# Lab settings for a quiet, deterministic page: every cell in the DOM (no virtual scrolling), no news toasts, and
# no autosave, which would write the outputs into the committed notebook.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyterlab(port: int, token: str, home: Path) -> subprocess.Popen:
    for name, settings in LAB_SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = dict(os.environ, PAGEDLAB_SMOKE="1", JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTER_CONFIG_DIR=str(home / "config"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={ROOT / 'notebooks'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")     # containers and CI runners often run as root
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "w"))


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout:.0f} s")


NOTEBOOK = "window.jupyterapp.shell.currentWidget"
KERNEL_IDLE = f"{NOTEBOOK}?.sessionContext?.session?.kernel?.status === 'idle'"
RUN_STATE = f"""() => {{
    const cells = {NOTEBOOK}.content.widgets.filter(cell => cell.model.type === "code");
    const errors = cells.flatMap(cell => cell.model.toJSON().outputs.filter(o => o.output_type === "error")
                                                                    .map(o => o.ename + ": " + o.evalue));
    return {{idle: {KERNEL_IDLE}, errors,
             pending: cells.filter(cell => cell.model.executionCount === null
                                           || cell.node.classList.contains("jp-mod-running")).length}};
}}"""


def run_all_cells(page, timeout: float = 300) -> None:
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = page.evaluate(RUN_STATE)
        if state["errors"]:
            raise AssertionError(f"cells raised: {state['errors']}")
        if state["idle"] and not state["pending"]:
            return
        page.wait_for_timeout(500)
    raise TimeoutError(f"the notebook did not finish running within {timeout:.0f} s")


def plot_sources(cell) -> list[str]:
    """The data URLs of the images in the cell's output, read at one instant."""
    return cell.evaluate("node => [...node.querySelectorAll('.jp-OutputArea-output img')].map(img => img.src)")


def wait_for_new_plots(page, cell, before: list[str], timeout: float = 60) -> list[str]:
    """The cell's images once all of them have been replaced by new ones (the simulator re-ran)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        after = plot_sources(cell)
        if len(after) == len(before) and not set(after) & set(before):
            return after
        page.wait_for_timeout(250)
    raise AssertionError(f"the playground's plots were not redrawn within {timeout:.0f} s of moving the slider")


def drag_slider(page, cell, label: str, fraction: float) -> None:
    """Press a slider's handle, drag it to `fraction` of the track's length and release, as a user would."""
    slider = cell.locator(".widget-slider", has=page.locator(".widget-label", has_text=label))
    handle, track = slider.locator(".noUi-handle").bounding_box(), slider.locator(".noUi-target").bounding_box()
    y = handle["y"] + handle["height"] / 2
    page.mouse.move(handle["x"] + handle["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], y, steps=12)
    page.mouse.up()


def check(page, notebook: str, out: Path) -> None:
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    print(f"opened {notebook}; running all cells")
    started = time.monotonic()
    run_all_cells(page)
    print(f"all cells ran in {time.monotonic() - started:.1f} s, no errors")
    dashboard = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text="LiveDashboard("))
    if dashboard.count():
        if not plot_sources(dashboard):
            raise AssertionError("the live dashboard drew no plot")
        print("live dashboard: plot drawn")

    cell = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text="SimPlayground("))
    cell.locator(".jp-OutputArea-output img").first.wait_for(timeout=60_000)
    cell.scroll_into_view_if_needed()
    before = plot_sources(cell)
    budget_before = cell.locator(".widget-html-content code").first.inner_text()
    drag_slider(page, cell, "gpu_memory_utilization", 0.7)
    after = wait_for_new_plots(page, cell, before)
    budget_after = cell.locator(".widget-html-content code").first.inner_text()
    print(f"slider moved: {budget_before.split('=')[0].strip()}\n          -> {budget_after.split('=')[0].strip()}")
    print(f"plot redrawn: {len(after)} image(s), {sum(a != b for a, b in zip(after, before))} changed")
    cell.evaluate("node => node.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(out))
    print(f"screenshot: {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the screenshot (.png)")
    parser.add_argument("--notebook", default="07_live.ipynb", help="a notebook in notebooks/ with a SimPlayground")
    parser.add_argument("--chromium", default=CHROMIUM, help="path of the chromium binary")
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="pagedlab-browser-check-") as home:
        server = start_jupyterlab(port, token, Path(home))
        try:
            wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server, Path(home) / "server.log")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1500, "height": 1400})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{args.notebook}?token={token}")
                try:
                    check(page, args.notebook, args.out)
                except Exception:
                    page.screenshot(path=str(args.out))
                    raise
                finally:
                    browser.close()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
