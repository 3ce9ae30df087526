"""The main job in a real browser: a chapter run through JupyterLab's UI in headless Chromium.

Called by `cargo xtask test` (or `cargo xtask browser-test`), which starts JupyterLab the way
`cargo xtask lab` does, on loopback with a token, and passes its address here. Driving
Debian's `chromium` through Playwright (no browser download), this script opens the notebook,
runs all cells from the Run menu, waits for them, checks that figures rendered in the output
areas and that nothing appeared on stderr or as an error, then edits one value in the
`parameters` cell through the editor, runs all cells again and checks that the output
followed the edit. Screenshots go to `--screenshots`. The notebook file itself must not change
(the server runs with autosave off; the file's bytes are compared and restored).
"""
import argparse
import hashlib
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

# An output area's rendered widget carries both the output class and its renderer's class.
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
STDOUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]'
FIGURES = ", ".join(f".jp-OutputArea-output{sep}.jp-Rendered{kind} img"
                    for sep in ("", " ") for kind in ("SVG", "Image"))


class BrowserTestError(Exception):
    pass


def api(base, token, path, method="GET"):
    request = urllib.request.Request(f"{base}{path}", method=method,
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def wait_for_server(base, token, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            api(base, token, "/api/status")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise BrowserTestError(f"JupyterLab did not answer at {base} within {timeout} s") from None
            time.sleep(0.5)


def displayed_figures(notebook):
    """How many figures the notebook displays: code cells whose last line is a figure
    expression (the cell's value), not a statement."""
    count = 0
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        lines = [line for line in source.strip().splitlines() if line.strip()]
        if cell["cell_type"] == "code" and "Figure" in source and lines and not lines[-1].rstrip().endswith(";"):
            count += 1
    return count


def prompts(page):
    return page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent.trim())")


def counts(page):
    return [int(m.group(1)) if (m := re.search(r"\[(\d+)\]", p)) else None for p in prompts(page)]


def errors_shown(page):
    return page.eval_on_selector_all(STDERR, "els => els.map(e => e.innerText)")


def menu(page, top, item):
    """Clicks menu `top`, then its entry `item` once it is shown and enabled."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(top)}$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
    entry = page.locator(".lm-Menu-item", has=label)
    entry.wait_for(state="visible", timeout=10_000)
    page.wait_for_function(
        "el => !el.classList.contains('lm-mod-disabled')", arg=entry.element_handle(), timeout=10_000)
    entry.click()


def started(page, after):
    return any("*" in p for p in prompts(page)) or any(c is not None and c > after for c in counts(page))


def run_all(page, after, timeout):
    """Run > Run All Cells, then waits until every code cell shows an execution count above
    `after` (so a re-run is not mistaken for the previous one). Fails fast on error output."""
    # The notebook must be the current widget for the Run menu to act on it.
    page.locator(".jp-NotebookPanel .jp-Cell .jp-InputPrompt").first.click()
    for attempt in range(3):
        menu(page, "Run", "Run All Cells")
        begun = time.monotonic()
        while not started(page, after) and time.monotonic() - begun < 10:
            time.sleep(0.25)
        if started(page, after):
            break
        print(f"   Run All Cells started nothing (attempt {attempt + 1}); trying again", flush=True)
    deadline, stalled_since = time.monotonic() + timeout, None
    while True:
        shown = errors_shown(page)
        if shown:
            raise BrowserTestError("error output appeared:\n" + "\n---\n".join(shown))
        now = counts(page)
        if now and all(c is not None and c > after for c in now):
            return max(now)
        running = any("*" in p for p in prompts(page))
        if not running:
            # Nothing queued and some cells not run: JupyterLab stopped the run.
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 15:
                raise BrowserTestError(f"the run stopped with cells not run: prompts {prompts(page)}")
        else:
            stalled_since = None
        if time.monotonic() > deadline:
            raise BrowserTestError(f"cells still running after {timeout} s: prompts {prompts(page)}")
        time.sleep(0.5)


def check_figures(page, expected):
    page.wait_for_function(
        f"() => [...document.querySelectorAll({json.dumps(FIGURES)})].filter(i => i.complete && i.naturalWidth > 0).length >= {expected}",
        timeout=30_000)
    loaded = page.eval_on_selector_all(FIGURES, "els => els.filter(i => i.naturalWidth > 0).length")
    if loaded < expected:
        raise BrowserTestError(f"{loaded} figures rendered in the output areas; the notebook displays {expected}")
    return loaded


def edit_parameter(page, name, new_line):
    """Replaces the line `let NAME: ...` of the parameters cell by typing in its editor."""
    line = page.locator(".jp-CodeCell .cm-line", has_text=re.compile(rf"^let {re.escape(name)}:")).first
    line.scroll_into_view_if_needed()
    line.click()
    page.keyboard.press("Home")
    page.keyboard.press("Shift+End")
    page.keyboard.type(new_line)
    page.keyboard.press("Escape")  # back to command mode
    text = line.inner_text()
    if text.strip() != new_line.strip():
        raise BrowserTestError(f"the editor shows `{text}` after typing `{new_line}`")


def screenshot(page, locator, path):
    locator.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    print(f"   screenshot {path}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="JupyterLab's base URL, e.g. http://127.0.0.1:8890")
    p.add_argument("--token", required=True)
    p.add_argument("--notebook", type=Path, required=True, help="the notebook file (under the server's root)")
    p.add_argument("--chromium", required=True)
    p.add_argument("--screenshots", type=Path, required=True)
    p.add_argument("--timeout", type=int, default=480, help="seconds for one run of all cells")
    args = p.parse_args()

    start = time.monotonic()
    original = args.notebook.read_bytes()
    digest = hashlib.sha256(original).hexdigest()
    expected = displayed_figures(args.notebook)
    args.screenshots.mkdir(parents=True, exist_ok=True)
    stem = args.notebook.stem
    ok = False
    try:
        wait_for_server(args.url, args.token, 60)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            try:
                page.goto(f"{args.url}/lab/tree/{args.notebook.name}?token={args.token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell .cm-content", timeout=90_000)
                page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
                print(f"   {stem} open, kernel idle at {time.monotonic() - start:.1f} s", flush=True)

                last = run_all(page, 0, args.timeout)
                figures = check_figures(page, expected)
                if page.locator(STDOUT).count() == 0:
                    # The stderr check looks for outputs the same way: it must see these.
                    raise BrowserTestError("no stdout output found: the output selectors are wrong")
                print(f"   run all: {len(counts(page))} code cells done, {figures} figures rendered, "
                      f"no error output, at {time.monotonic() - start:.1f} s", flush=True)
                screenshot(page, page.locator(FIGURES).first, args.screenshots / f"{stem}-run-all.png")

                edit_parameter(page, "flips", "let flips: usize = 40;      // 抛硬币次数")
                screenshot(page, page.locator(".jp-CodeCell .cm-line", has_text="let flips: usize = 40;").first,
                           args.screenshots / f"{stem}-edited-parameter.png")
                run_all(page, last, args.timeout)
                check_figures(page, expected)
                outputs = page.eval_on_selector_all(".jp-OutputArea-output", "els => els.map(e => e.innerText)")
                if not any("40 次抛掷" in o for o in outputs) or any("100 次抛掷" in o for o in outputs):
                    raise BrowserTestError("after the edit the output does not say 40 flips (`40 次抛掷`)")
                print(f"   edited flips = 40 and ran all again: the output follows, at "
                      f"{time.monotonic() - start:.1f} s", flush=True)
                screenshot(page, page.locator(FIGURES).first, args.screenshots / f"{stem}-after-edit.png")
                if page_errors:
                    raise BrowserTestError("JavaScript errors in the page: " + "; ".join(page_errors))
                ok = True
            except Exception:
                page.screenshot(path=str(args.screenshots / f"{stem}-failure.png"))
                print(f"   screenshot {args.screenshots / f'{stem}-failure.png'}", file=sys.stderr)
                raise
            finally:
                browser.close()
    except BrowserTestError as e:
        print(f"FAILED browser test of {args.notebook.name}: {e}", file=sys.stderr)
    finally:
        try:
            api(args.url, args.token, "/api/shutdown", method="POST")
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if hashlib.sha256(args.notebook.read_bytes()).hexdigest() != digest:
            args.notebook.write_bytes(original)
            print(f"FAILED: {args.notebook} was written during the test (restored)", file=sys.stderr)
            ok = False
    if ok:
        print(f"ok     browser test of {args.notebook.name}: {time.monotonic() - start:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
