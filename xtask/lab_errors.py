"""Developer measurement (issue 11): does JupyterLab show every failing cell's message?

evcxr 0.22 sends a cell's stderr (an `Err` returned with `?`, a panic) from another thread,
so the cell's idle status can arrive first. JupyterLab forgets a request once it has its reply
and its idle status, so a message that comes later is lost (or, under Run All, where the next
request is already in the kernel, shows under the next cell). This script measures it: it
starts JupyterLab on a notebook of failing cells (even cells return an `Err` with `?`, odd
cells panic, each message naming its cell), drives it in headless Chromium with Playwright,
and reads every cell's outputs from JupyterLab's own notebook model (what the page renders).

    .venv/bin/python xtask/lab_errors.py --cells 50 --mode each --runs 1

Modes: `each` runs one cell at a time and waits for it, as a learner pressing Shift+Enter
does; `all` is Run All Cells. Needs `chromium` (Debian package; Playwright is pointed at
/usr/bin/chromium, no browser download) and `playwright` in .venv (xtask/requirements.txt).
Not part of `cargo xtask test`: a run of 50 cells takes about a minute.
"""
import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("GENLAB_CHROMIUM", "/usr/bin/chromium")


def failing_notebook(cells, prelude, kernel):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(prelude or "let survivor: u64 = 42;"))
    for k in range(cells):
        if k % 2 == 0:
            source = f'let failing: Result<(), String> = Err(String::from("lab cell {k}: an Err returned with ?"));\nfailing?;'
        else:
            source = f'panic!("lab cell {k}: a panic");'
        nb.cells.append(nbformat.v4.new_code_cell(source))
    nb.metadata["kernelspec"] = {"display_name": kernel, "language": "rust", "name": kernel}
    return nb


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PANEL = "window.jupyterapp && window.jupyterapp.shell.currentWidget"
KERNEL = f"{PANEL} && {PANEL}.sessionContext.session && {PANEL}.sessionContext.session.kernel"

READ_OUTPUTS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const out = [];
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    out.push({count: c.executionCount, outputs: c.outputs.toJSON()});
  }
  return out;
}"""


def classify(cells, n):
    """Per failing cell k: 'shown' (its message under it), 'misplaced' (only under another
    cell) or 'lost'."""
    texts = []
    for c in cells:
        texts.append("".join(
            "".join(o["text"]) if isinstance(o.get("text"), list) else o.get("text", "")
            for o in c["outputs"] if o.get("output_type") == "stream"))
    result = []
    for k in range(n):
        tag = f"lab cell {k}:"
        own = tag in texts[k + 1]
        elsewhere = any(tag in t for i, t in enumerate(texts) if i != k + 1)
        result.append("shown" if own else "misplaced" if elsewhere else "lost")
    return result


def run_once(page, mode, n, settle):
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    start = time.perf_counter()
    if mode == "all":
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_function(
            f"""() => {{ const cells = {PANEL}.content.model.cells;
                for (let i = 0; i < cells.length; i++) if (cells.get(i).executionCount === null) return false;
                return {KERNEL}.status === 'idle'; }}""", timeout=600_000, polling=100)
    else:
        for i in range(n + 1):
            page.evaluate(f"""async () => {{ const nb = {PANEL}.content; nb.activeCellIndex = {i};
                await window.jupyterapp.commands.execute('notebook:run-cell'); }}""")
            page.wait_for_function(f"() => {PANEL}.content.model.cells.get({i}).executionCount !== null "
                                   f"&& {KERNEL}.status === 'idle'", timeout=600_000, polling=20)
    seconds = time.perf_counter() - start
    time.sleep(settle)  # anything still in flight has arrived by now
    cells = page.evaluate(READ_OUTPUTS)
    return classify(cells, n), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=50)
    p.add_argument("--mode", choices=["each", "all", "both"], default="both")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading outputs")
    p.add_argument("--prelude", default="", help="code of the first cell (e.g. a genlab setup cell)")
    p.add_argument("--json", type=Path, help="write the per-cell results here")
    p.add_argument("--kernel", default="genlab-rust", help="kernel name (e.g. a patched evcxr to compare)")
    args = p.parse_args()

    work = ROOT / "target/lab-errors"
    work.mkdir(parents=True, exist_ok=True)
    nbformat.write(failing_notebook(args.cells, args.prelude, args.kernel), work / "failing.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    settings = work / "settings"
    settings.mkdir(exist_ok=True)
    lab = subprocess.Popen(
        [str(ROOT / ".venv/bin/jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--LabApp.expose_app_in_browser=True", "--allow-root", f"--LabApp.user_settings_dir={settings}",
         f"--LabApp.workspaces_dir={work / 'workspaces'}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "lab.log", "w"), cwd=work)
    report = {"cells": args.cells, "runs": []}
    try:
        for _ in range(120):
            if lab.poll() is not None:
                sys.exit(f"JupyterLab exited (status {lab.returncode}); see {work / 'lab.log'}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/failing.ipynb?token={token}")
            page.wait_for_function(f"() => {KERNEL} && {KERNEL}.status === 'idle'", timeout=180_000)
            modes = ["each", "all"] if args.mode == "both" else [args.mode]
            for run in range(1, args.runs + 1):
                for mode in modes:
                    result, seconds = run_once(page, mode, args.cells, args.settle)
                    counts = {k: result.count(k) for k in ("shown", "misplaced", "lost")}
                    bad = [i for i, r in enumerate(result) if r != "shown"]
                    print(f"run {run}, mode {mode}: {counts['shown']}/{args.cells} shown under their cell, "
                          f"{counts['misplaced']} under another cell, {counts['lost']} lost "
                          f"({seconds:.1f} s); not shown: cells {bad}", flush=True)
                    report["runs"].append({"run": run, "mode": mode, "seconds": round(seconds, 1),
                                           **counts, "per_cell": result})
            browser.close()
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    shown = sum(r["shown"] for r in report["runs"])
    total = args.cells * len(report["runs"])
    print(f"total: {shown}/{total} messages shown under their cell")
    sys.exit(0 if shown == total else 1)


if __name__ == "__main__":
    main()
