#!/usr/bin/env python
"""Check the lab in a real browser: start JupyterLab, open every notebook in Chromium (driven by Playwright) in
full mode, Run All, check no cell raised, move the notebook's main control (the widget with the class
`pagedlab-main-control`) as a user would, and check that its main figure (`pagedlab-main-figure`) was redrawn.
In 07, after Run All, the dashboard must keep redrawing once its memory control moved, and the simulator
playground must re-run when its slider is dragged.

    .venv/bin/python scripts/browser_check.py --out out       # or: make browser-check

Uses Debian's chromium (apt-get install -y chromium), not a browser downloaded by Playwright. One screenshot
per notebook lands in --out. Exits non-zero, naming each notebook that failed and why.
"""
import argparse
import importlib.metadata
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


def widgets_data_dir() -> str:
    """The share/jupyter folder holding the widgets' lab extension, wherever jupyterlab_widgets is installed (a
    virtual environment layered on another sees the packages but not their data files)."""
    dist = importlib.metadata.distribution("jupyterlab_widgets")
    extension = next(f for f in dist.files if "labextensions" in f.parts)
    path = Path(dist.locate_file(extension)).resolve()
    return str(path.parents[len(extension.parts) - extension.parts.index("labextensions") - 1])


def start_jupyterlab(port: int, token: str, home: Path) -> subprocess.Popen:
    for name, settings in LAB_SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTER_CONFIG_DIR=str(home / "config"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PAGEDLAB_SMOKE", None)     # full mode, as a learner runs them
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [widgets_data_dir(), os.environ.get("JUPYTER_PATH")]))
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
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


NOTEBOOK = "window.jupyterapp?.shell?.currentWidget"
KERNEL_IDLE = f"{NOTEBOOK}?.sessionContext?.session?.kernel?.status === 'idle'"
RUN_STATE = f"""() => {{
    const cells = {NOTEBOOK}.content.widgets.filter(cell => cell.model.type === "code");
    const errors = cells.flatMap(cell => cell.model.toJSON().outputs.filter(o => o.output_type === "error")
                                                                    .map(o => o.ename + ": " + o.evalue));
    return {{idle: {KERNEL_IDLE}, errors,
             pending: cells.filter(cell => cell.model.executionCount === null
                                           || cell.node.classList.contains("jp-mod-running")).length}};
}}"""


def run_all_cells(page, timeout: float = 420) -> None:
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


MAIN_FIGURE = """node => {
    const el = node.querySelector('.pagedlab-main-figure');
    if (!el) return null;
    return el.tagName === 'IMG' ? [el.src] : [...el.querySelectorAll('img')].map(img => img.src);
}"""


def figure_sources(cell) -> list[str]:
    """The data URLs of the cell's main figure (its `pagedlab-main-figure` widget), read at one instant."""
    return cell.evaluate(MAIN_FIGURE) or []


def wait_for_new_figure(page, cell, before: list[str], what: str, timeout: float = 90) -> list[str]:
    """The main figure once it has been replaced by a new one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        after = figure_sources(cell)
        if after and not set(after) & set(before):
            return after
        page.wait_for_timeout(250)
    raise AssertionError(f"{what}: the figure was not redrawn within {timeout:.0f} s")


def move_control(page, control, target: float | None = None) -> str:
    """Move a main control as a user would: drag a slider's handle across, pick another option of a dropdown,
    press another toggle button, or press play. Returns what was done."""
    control.scroll_into_view_if_needed()       # the mouse only reaches what is on screen
    handle = control.locator(".noUi-handle")
    if handle.count():
        box, track = handle.first.bounding_box(), control.locator(".noUi-target").first.bounding_box()
        at = (box["x"] + box["width"] / 2 - track["x"]) / track["width"]
        target = target if target is not None else 0.2 if at > 0.5 else 0.8
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] / 2, y)
        page.mouse.down()
        page.mouse.move(track["x"] + target * track["width"], y, steps=12)
        page.mouse.up()
        return f"dragged the slider from {at:.2f} to {target:.2f} of its track"
    select = control.locator("select")
    if select.count():
        options = select.first.locator("option").all_inner_texts()
        current = select.first.evaluate("s => s.options[s.selectedIndex].text")
        choice = next(o for o in options if o != current)
        select.first.select_option(label=choice)
        return f"picked {choice!r} instead of {current!r}"
    buttons = control.locator("button:not(.mod-active)")
    if buttons.count():
        label = buttons.first.inner_text()
        buttons.first.click()
        return f"pressed {label!r}"
    raise AssertionError("the main control is neither a slider, a dropdown nor buttons")


def check_errors(page) -> None:
    errors = page.evaluate(RUN_STATE)["errors"]
    if errors:
        raise AssertionError(f"cells raised: {errors}")


def check_notebook(page, notebook: str, out: Path) -> None:
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    started = time.monotonic()
    run_all_cells(page)
    print(f"{notebook}: all cells ran in {time.monotonic() - started:.1f} s, no errors")
    cell = page.locator(".jp-CodeCell", has=page.locator(".pagedlab-main-control")).first
    cell.locator(".pagedlab-main-figure").first.wait_for(timeout=60_000)
    cell.scroll_into_view_if_needed()
    deadline = time.monotonic() + 60
    while not figure_sources(cell) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    before = figure_sources(cell)
    done = move_control(page, cell.locator(".pagedlab-main-control").first)
    after = wait_for_new_figure(page, cell, before, notebook)
    print(f"{notebook}: {done}; the main figure was redrawn")
    if "07_" in notebook:
        later = wait_for_new_figure(page, cell, after, f"{notebook} after the restart")
        wait_for_new_figure(page, cell, later, f"{notebook}, still updating")
        print(f"{notebook}: the dashboard keeps updating after the control moved")
        check_playground(page)
    check_errors(page)
    cell.evaluate("node => node.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    page.screenshot(path=str(out))
    print(f"{notebook}: screenshot {out}")


def check_playground(page) -> None:
    """07's simulator playground: dragging gpu_memory_utilization re-runs it and redraws both figures."""
    cell = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text="SimPlayground("))
    cell.scroll_into_view_if_needed()
    images = "node => [...node.querySelectorAll('.jp-OutputArea-output img')].map(img => img.src)"
    before = cell.evaluate(images)
    slider = cell.locator(".widget-slider", has=page.locator(".widget-label", has_text="gpu_memory_utilization"))
    move_control(page, slider, target=0.7)     # 0.75: the 13B model still fits, with less KV
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = cell.evaluate(images)
        if len(after) == len(before) and not set(after) & set(before):
            print(f"playground: gpu_memory_utilization moved, {len(after)} figures redrawn")
            return
        page.wait_for_timeout(250)
    raise AssertionError("the playground's plots were not redrawn within 60 s of moving the slider")


def shut_down_kernels(base: str, token: str) -> None:
    """End every kernel the check started, so the next notebook has the CPU."""
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}") as reply:
        sessions = json.load(reply)
    for session in sessions:
        request = urllib.request.Request(f"{base}/api/sessions/{session['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(request).close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "out", help="directory for the screenshots")
    parser.add_argument("--notebooks", nargs="*", default=[p.name for p in sorted((ROOT / "notebooks").glob("*.ipynb"))],
                        help="notebooks in notebooks/ (default: all of them)")
    parser.add_argument("--chromium", default=CHROMIUM, help="path of the chromium binary")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    failures = []
    with tempfile.TemporaryDirectory(prefix="pagedlab-browser-check-") as home:
        server = start_jupyterlab(port, token, Path(home))
        try:
            wait_for_server(f"{base}/api/status?token={token}", server, Path(home) / "server.log")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                for notebook in args.notebooks:
                    page = browser.new_page(viewport={"width": 1500, "height": 1400})
                    page.goto(f"{base}/lab/tree/{notebook}?reset&token={token}")     # reset: no tabs of earlier notebooks
                    screenshot = args.out / f"browser-check-{Path(notebook).stem}.png"
                    try:
                        check_notebook(page, notebook, screenshot)
                    except Exception as exc:  # noqa: BLE001 - every notebook is checked; failures reported at the end
                        page.screenshot(path=str(screenshot))
                        failures.append(f"{notebook}: {exc}")
                        print(f"{notebook}: FAILED: {exc}")
                    finally:
                        page.close()
                        shut_down_kernels(base, token)
                browser.close()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    if failures:
        print("\n".join(["browser check failed:", *failures]))
        return 1
    print(f"browser check passed: {len(args.notebooks)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
