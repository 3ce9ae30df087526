"""Turn executed genlab chapters into MkDocs pages for the learner's notes.

Called by `cargo xtask export` (and by `cargo xtask test`); not meant to be run by hand.

For each chapter `notebooks/NAME.ipynb` it takes the executed copy `<exports>/NAME/NAME.ipynb`
(running the chapter first with `nbrun.py` unless that copy is newer than the notebook and the
crate and ran cleanly) and writes, under `<out>/docs/`:

- `NAME.md`: the chapter's Markdown cells as they are (math stays `$$ ... $$` / `$ ... $`),
  the parameters it ran with under its title, each code cell as a ```rust fence (the `:dep`
  setup cell and the runner's injected-parameters cell folded into `??? note` admonitions),
  text outputs as plain blocks, and each figure as an image with its title as the caption;
- `assets/NAME/STEM.png` and `STEM.svg` for each figure. STEM comes from the name the notebook
  gave the figure (`Figure::name`) or else its title, never from its position, so it survives
  inserted cells; two figures with the same name or title get `-2`, `-3` in display order.

It also writes `<out>/mkdocs.yml` (Material theme, arithmatex for the math, the chapters in
order) and `<out>/docs/index.md`. MkDocs refuses a `docs_dir` that holds its own `mkdocs.yml`,
so the pages live in `<out>/docs/` next to the config. `--build` then runs
`mkdocs build --strict` and checks that every image and asset link in the built site resolves.

Pages are written by this module rather than nbconvert's Markdown exporter: the admonitions,
captions, parameter table and stable file names are what a page of notes needs, and each
would have been a template override there.

`--check-stable NOTEBOOK` is the live test of the stable names: it runs a copy of the chapter
with a figure cell inserted after its parameters cell and checks that every figure keeps its
file name while the runner's numbered files shift.
"""
import argparse
import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))
from nbrun import FIGURE_ERRORS, ParamError, declared_parameters, stdout_text  # noqa: E402

FIGURE_MIME = "application/vnd.genlab.figure+json"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
EVCXR_TIMING = re.compile(r"^<span[^>]*>Took \d+ms</span>$")


class ExportError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Names


def figure_stem(text):
    """A file-name stem from a figure's name or title: letters and digits of any script kept
    (the titles are Chinese with the English term in brackets), ASCII lower-cased, every run of
    anything else one `-`, at most 60 characters."""
    text = unicodedata.normalize("NFKC", text)
    out, dash = [], False
    for c in text:
        if c.isalnum():
            if dash and out:
                out.append("-")
            out.append(c.lower() if c.isascii() else c)
            dash = False
        else:
            dash = True
    return "".join(out)[:60].strip("-")


def assign_stems(figures):
    """Stable stems for a chapter's figures (dicts with `title` and optional `name`), in
    display order: each from its own name or title only; repeats get `-2`, `-3`, ..."""
    seen, stems = {}, []
    for fig in figures:
        base = figure_stem(fig.get("name") or fig.get("title") or "") or "figure"
        seen[base] = seen.get(base, 0) + 1
        stems.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return stems


# ---------------------------------------------------------------------------------------------
# Reading an executed chapter


def cell_tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def is_setup_cell(cell):
    return cell.cell_type == "code" and any(line.lstrip().startswith(":dep") for line in cell.source.splitlines())


def chapter_parameters(nb):
    """[(name, type, value, default)] the chapter ran with: the parameters cell's bindings, with
    the values of the injected-parameters cell where the run overrode them."""
    declared, injected = {}, {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "parameters" in cell_tags(cell):
            declared = declared_parameters(cell.source)
        elif "injected-parameters" in cell_tags(cell):
            injected = declared_parameters(cell.source)
    return [(name, ty, injected.get(name, (ty, value))[1], value) for name, (ty, value) in declared.items()]


def output_text(out):
    text = out.get("text", "")
    return ANSI.sub("", "".join(text) if isinstance(text, list) else text)


def figure_outputs(nb):
    """(cell index, output index, record) for every displayed figure, in display order. The
    record is the one genlab's `Figure` sends next to the image; an image from elsewhere gets a
    name from a hash of its bytes."""
    found = []
    for ci, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for oi, out in enumerate(cell.get("outputs", [])):
            data = out.get("data", {}) if out.output_type in ("execute_result", "display_data") else {}
            if FIGURE_MIME in data:
                record = data[FIGURE_MIME]
                if isinstance(record, str):
                    record = json.loads(record)
                found.append((ci, oi, dict(record)))
            elif "image/png" in data or "image/svg+xml" in data:
                blob = data.get("image/png") or data.get("image/svg+xml")
                digest = hashlib.sha1("".join(blob).encode()).hexdigest()[:10]
                found.append((ci, oi, {"title": "", "name": f"figure-{digest}", "files": None}))
    return found


def run_problems(nb, folder=None):
    """Why an executed copy cannot be used as it stands (empty when it can): a cell that did not
    run or has error output, a figure that was not drawn, an image without genlab's record, the
    notebook's pass line (metadata `genlab.require_stdout`) never printed; and, from the run's
    own records in `folder` (the runner's `timings.json` and the figure-errors file), a cell the
    runner failed (e.g. one that stopped early with its message lost) or a figure that could not
    be exported."""
    problems = []
    required = nb.metadata.get("genlab", {}).get("require_stdout")
    if required and required not in stdout_text(nb.cells):
        problems.append(f"it never printed its pass line `{required}`")
    if folder is not None:
        timings = Path(folder) / "timings.json"
        if timings.is_file():
            failed = [r.get("cell") for r in json.loads(timings.read_text()).get("cells", []) if r.get("failed")]
            if failed:
                problems.append(f"the runner failed cell {failed[0]} in that run")
        errors = Path(folder) / FIGURE_ERRORS
        if errors.is_file() and errors.read_text(encoding="utf-8", errors="replace").strip():
            problems.append(f"a figure could not be drawn or exported in that run ({errors.name})")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if cell.get("execution_count") is None:
            problems.append(f"cell {i} did not run")
            break
        for out in cell.get("outputs", []):
            if out.output_type == "error" or (out.output_type == "stream" and out.get("name") == "stderr"
                                              and output_text(out).strip()):
                problems.append(f"cell {i} has error output")
            data = out.get("data", {}) if out.output_type in ("execute_result", "display_data") else {}
            plain = data.get("text/plain", "")
            if ("".join(plain) if isinstance(plain, list) else plain).startswith("figure not drawn:"):
                problems.append(f"cell {i} has a figure that was not drawn")
            if ("image/png" in data or "image/svg+xml" in data) and FIGURE_MIME not in data:
                problems.append(f"cell {i} has a figure without genlab's figure record (an older run)")
    return problems


# ---------------------------------------------------------------------------------------------
# Writing a page


def fence(text, lang):
    ticks = max([3] + [len(m) + 1 for m in re.findall(r"`{3,}", text)])
    return f"{'`' * ticks}{lang}\n{text.rstrip()}\n{'`' * ticks}"


def indent(text, by="    "):
    return "\n".join(by + line if line.strip() else "" for line in text.splitlines())


def admonition(kind, title, body):
    return f'??? {kind} "{title}"\n\n{indent(body)}'


def escape_markdown(text):
    return re.sub(r"([\\`*_\[\]<>&$])", lambda m: {"<": "&lt;", ">": "&gt;", "&": "&amp;"}.get(
        m.group(1), "\\" + m.group(1)), text)


def parameters_block(params):
    if not params:
        return ""
    rows = ["本页运行时的参数 (parameters)：", "", "| 参数 | 类型 | 值 | 默认值 |", "| --- | --- | --- | --- |"]
    for name, ty, value, default in params:
        mark = "" if value == default else "（已覆盖）"
        cells = [f"`{name}`", f"`{ty}`", f"`{value}`{mark}", f"`{default}`"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def figure_block(chapter, stem, title, has_png):
    src = f"assets/{chapter}/{stem}.{'png' if has_png else 'svg'}"
    alt = (title or stem).replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    caption = escape_markdown(title or stem)
    return (f'<figure markdown="span">\n  ![{alt}]({src})\n'
            f"  <figcaption>{caption}</figcaption>\n</figure>")


def write_figure_files(out, record, figures_dir, assets, stem):
    """Copies the figure's auto-exported PNG and SVG into the assets folder (or, for an image
    without them, writes what the output holds). Returns whether a PNG was written."""
    files = record.get("files")
    copied = False
    if files and figures_dir is not None:
        for ext in ("png", "svg"):
            src = figures_dir / f"{files}.{ext}"
            if src.is_file():
                shutil.copyfile(src, assets / f"{stem}.{ext}")
                copied = True
    if not copied:
        data = out.get("data", {})
        if "image/png" in data:
            (assets / f"{stem}.png").write_bytes(base64.b64decode("".join(data["image/png"])))
        if "image/svg+xml" in data:
            (assets / f"{stem}.svg").write_text("".join(data["image/svg+xml"]), encoding="utf-8")
    return (assets / f"{stem}.png").is_file()


def output_blocks(cell, figure_at, write_figure):
    blocks, stream = [], None
    for oi, out in enumerate(cell.get("outputs", [])):
        if out.output_type == "stream":
            text = output_text(out)
            if stream is not None and stream[0] == out.get("name"):
                stream[1].append(text)
                continue
            stream = (out.get("name"), [text])
            blocks.append(stream)
            continue
        stream = None
        if oi in figure_at:
            blocks.append(write_figure(out, figure_at[oi]))
        elif out.output_type == "error":
            blocks.append(fence(ANSI.sub("", "\n".join(out.get("traceback", [])))
                                or f"{out.get('ename')}: {out.get('evalue')}", "text"))
        else:
            data = out.get("data", {})
            if "text/markdown" in data:
                blocks.append("".join(data["text/markdown"]))
            elif "text/html" in data:
                markup = "".join(data["text/html"]).strip()
                if not EVCXR_TIMING.match(markup):
                    blocks.append(markup)
            elif "text/plain" in data:
                blocks.append(fence(ANSI.sub("", "".join(data["text/plain"])), "text"))
    return [fence("".join(b[1]), "text") if isinstance(b, tuple) else b for b in blocks
            if not (isinstance(b, tuple) and not "".join(b[1]).strip())]


REPO_LINK = re.compile(r"\[([^\]]*)\]\((\.\./[^)\s]*)\)")


def unlink_repository_files(markdown):
    """A chapter's links into the repository (`[`tests/vae.rs`](../tests/vae.rs)`, relative to
    notebooks/) point nowhere in the learner's notes: keep their text, drop the link."""
    return REPO_LINK.sub(lambda m: m.group(1), markdown)


def render_chapter(nb, chapter, figures_dir, docs):
    """Writes `docs/<chapter>.md` and `docs/assets/<chapter>/`; returns (page title, stems)."""
    assets = docs / "assets" / chapter
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    figures = figure_outputs(nb)
    stems = assign_stems([rec for _, _, rec in figures])
    by_cell = {}
    for (ci, oi, rec), stem in zip(figures, stems):
        by_cell.setdefault(ci, {})[oi] = (rec, stem)

    def write_figure(out, rec_stem):
        rec, stem = rec_stem
        has_png = write_figure_files(out, rec, figures_dir, assets, stem)
        return figure_block(chapter, stem, rec.get("title", ""), has_png)

    params = parameters_block(chapter_parameters(nb))
    title, parts = chapter, []
    for ci, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            source = unlink_repository_files(cell.source.strip())
            heading = re.match(r"#\s+(.+)", source)
            if params and heading and title == chapter:
                title = heading.group(1).strip()
                rest = source[heading.end():].strip()
                parts.append(f"# {title}")
                parts.append(params)
                params = ""
                if rest:
                    parts.append(rest)
            else:
                parts.append(source)
            continue
        if cell.cell_type != "code":
            continue
        code = fence(cell.source, "rust")
        if is_setup_cell(cell):
            code = admonition("note", "设置 (setup)", code)
        elif "injected-parameters" in cell_tags(cell):
            code = admonition("note", "本次运行注入的参数 (injected parameters)", code)
        parts.append(code)
        parts.extend(output_blocks(cell, by_cell.get(ci, {}), write_figure))
    if params:  # no heading to put them under
        parts.insert(0, params)
    header = f"<!-- Written by `cargo xtask export` from notebooks/{chapter}.ipynb. -->"
    (docs / f"{chapter}.md").write_text(header + "\n\n" + "\n\n".join(parts) + "\n", encoding="utf-8")
    return title, stems


MKDOCS_YML = """# Written by `cargo xtask export`: the genlab chapters as a MkDocs site.
# Build it here with `mkdocs build` (or `mkdocs serve`); the pages are in docs/.
site_name: genlab 笔记
docs_dir: docs
site_dir: site
theme:
  name: material
  language: zh
markdown_extensions:
  - admonition
  - attr_list
  - md_in_html
  - tables
  - pymdownx.details
  - pymdownx.superfences
  - pymdownx.arithmatex:
      generic: true
extra_javascript:
  - javascripts/mathjax.js
  - https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js
"""

MATHJAX_JS = """// Written by `cargo xtask export`: MathJax for pymdownx.arithmatex (generic mode).
window.MathJax = {
  tex: {
    inlineMath: [["\\\\(", "\\\\)"]],
    displayMath: [["\\\\[", "\\\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
"""


def page_title(path):
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def write_site(out):
    """`mkdocs.yml`, `index.md` and the MathJax config for every chapter page in `out/docs`."""
    docs = out / "docs"
    chapters = sorted(p for p in docs.glob("*.md") if p.name != "index.md")
    nav = ["nav:", "  - 首页: index.md"]
    index = ["# genlab 笔记", "", "每一章由 `cargo xtask export` 从执行过的 notebook 生成。", ""]
    for page in chapters:
        title = page_title(page)
        nav.append(f"  - {json.dumps(title, ensure_ascii=False)}: {page.name}")
        index.append(f"- [{escape_markdown(title)}]({page.name})")
    (docs / "javascripts").mkdir(parents=True, exist_ok=True)
    (docs / "javascripts" / "mathjax.js").write_text(MATHJAX_JS, encoding="utf-8")
    (docs / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    (out / "mkdocs.yml").write_text(MKDOCS_YML + "\n".join(nav) + "\n", encoding="utf-8")
    return chapters


# ---------------------------------------------------------------------------------------------
# Building and checking the site


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def broken_links(site):
    """(page, link) for each image, and each link into assets/, that resolves to no file.
    Returns (broken, number of images checked)."""
    broken, checked = [], 0
    for page in sorted(site.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        targets = parser.images + [h for h in parser.links if "assets/" in h]
        for link in targets:
            parsed = urllib.parse.urlparse(link)
            if parsed.scheme or parsed.netloc or link.startswith("data:"):
                continue
            path = urllib.parse.unquote(parsed.path)
            target = (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
            checked += link in parser.images
            if not target.resolve().is_file():
                broken.append((str(page.relative_to(site)), link))
    return broken, checked


def build_site(out, expect_images):
    """`mkdocs build --strict` in `out`, then every image link checked. Raises ExportError."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run([str(mkdocs), "build", "--strict", "--clean"], cwd=out,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"mkdocs build --strict failed in {out}:\n{result.stdout}{result.stderr}")
    broken, checked = broken_links(out / "site")
    if broken:
        raise ExportError("broken links in the built site: " + ", ".join(f"{p} -> {l}" for p, l in broken))
    if checked < expect_images:
        raise ExportError(f"the built site has {checked} images; the pages have {expect_images} figures")
    return checked


# ---------------------------------------------------------------------------------------------
# Running chapters


def crate_mtime(root):
    paths = [root / "Cargo.toml", root / "Cargo.lock"] + list((root / "src").rglob("*"))
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def executed_copy(exports, notebook):
    return exports / notebook.stem / notebook.name


def stale_reason(notebook, executed, crate_time):
    """Why `executed` cannot stand for `notebook` (None when it can)."""
    if not executed.is_file():
        return "not run yet"
    t = executed.stat().st_mtime
    if t < notebook.stat().st_mtime:
        return "the notebook changed since its last run"
    if t < crate_time:
        return "the crate changed since its last run"
    problems = run_problems(nbformat.read(executed, as_version=4), executed.parent)
    return "; ".join(problems) if problems else None


def nbrun(notebooks, exports, kernel, extra=()):
    cmd = [sys.executable, str(Path(__file__).parent / "nbrun.py"), "--kernel", kernel,
           "--export-root", str(exports), *extra, *map(str, notebooks)]
    return subprocess.run(cmd).returncode


def export(notebooks, exports, out, quiet=False):
    """Pages for `notebooks` from their executed copies under `exports`; returns figure count."""
    docs = out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    total = 0
    for notebook in notebooks:
        executed = executed_copy(exports, notebook)
        if not executed.is_file():
            raise ExportError(f"{executed} does not exist: run the chapter first")
        nb = nbformat.read(executed, as_version=4)
        problems = run_problems(nb, executed.parent)
        if problems:
            raise ExportError(f"{executed} cannot be exported: {'; '.join(problems)}")
        _, stems = render_chapter(nb, notebook.stem, executed.parent, docs)
        total += len(stems)
        if not quiet:
            print(f"notes  {notebook.stem}: {docs / (notebook.stem + '.md')}, {len(stems)} figures", flush=True)
    write_site(out)
    return total


def check_stable(notebook, exports, kernel, work, root):
    """Runs a copy of `notebook` with a figure cell inserted after its parameters cell, and
    checks that every figure of the original run keeps its file name."""
    before_nb = nbformat.read(executed_copy(exports, notebook), as_version=4)
    before = assign_stems([r for _, _, r in figure_outputs(before_nb)])
    before_files = [r.get("files") for _, _, r in figure_outputs(before_nb)]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    nb = nbformat.read(notebook, as_version=4)
    setup = next(i for i, c in enumerate(nb.cells) if is_setup_cell(c))
    # The copy lives outside notebooks/, so its `:dep` points at the crate by absolute path.
    nb.cells[setup].source = re.sub(r'path\s*=\s*"[^"]*"', f"path = {json.dumps(str(root))}",
                                    nb.cells[setup].source, count=1)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in cell_tags(c))
    inserted = "插入的图 (inserted figure)"
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(
        "let inserted_xs: Vec<f64> = vec![0.0, 1.0];\n"
        f"Figure::new({json.dumps(inserted, ensure_ascii=False)}).line(\"y = x\", &inserted_xs, &inserted_xs)"))
    copy = work / notebook.name
    nbformat.write(nb, copy)
    code = nbrun([copy], work / "exports", kernel, ["--smoke"])
    if code != 0:
        raise ExportError(f"the chapter with an inserted cell failed to run (exit {code})")
    after_nb = nbformat.read(work / "exports" / notebook.stem / notebook.name, as_version=4)
    after_records = [r for _, _, r in figure_outputs(after_nb)]
    after = assign_stems(after_records)
    export([copy], work / "exports", work / "notes", quiet=True)
    written = sorted(p.stem for p in (work / "notes/docs/assets" / notebook.stem).glob("*.png"))
    expected = sorted(before + [figure_stem(inserted)])
    if sorted(after) != expected or written != expected:
        raise ExportError(f"figure names changed after inserting a cell: before {before}, after {after}")
    shifted = sum(a != b for a, b in zip(before_files, [r.get("files") for r in after_records][1:]))
    print(f"ok     stable figure names: {len(before)} figures of {notebook.stem} keep their names with a "
          f"cell inserted (the runner's numbered files shifted for {shifted})", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--exports", type=Path, default=Path("exports"), help="where executed copies are")
    p.add_argument("--out", type=Path, default=Path("exports/notes"))
    p.add_argument("--kernel", default="genlab-rust")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--fresh", action="store_true", help="run every chapter, even when a run is current")
    p.add_argument("--no-run", action="store_true", help="only use executed copies; run nothing")
    p.add_argument("--build", action="store_true", help="mkdocs build --strict, then check the links")
    p.add_argument("--check-stable", action="store_true",
                   help="the stable-names test on the (executed) notebooks given")
    args = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    try:
        if args.check_stable:
            for notebook in args.notebooks:
                check_stable(notebook, args.exports, args.kernel,
                             root / "target/stable-names" / notebook.stem, root)
            return 0
        if not args.no_run:
            crate_time = crate_mtime(root)
            if args.fresh or args.param:
                stale = list(args.notebooks)
            else:
                stale = []
                for notebook in args.notebooks:
                    reason = stale_reason(notebook, executed_copy(args.exports, notebook), crate_time)
                    if reason:
                        stale.append(notebook)
                        print(f"run    {notebook.stem}: {reason}", flush=True)
                    else:
                        print(f"reuse  {notebook.stem}: {executed_copy(args.exports, notebook)} is current",
                              flush=True)
            if stale:
                extra = [a for item in args.param for a in ("--param", item)]
                code = nbrun(stale, args.exports, args.kernel, extra)
                if code != 0:
                    return code
        figures = export(args.notebooks, args.exports, args.out)
        print(f"notes  {args.out / 'mkdocs.yml'}: {len(args.notebooks)} chapters, {figures} figures", flush=True)
        if args.build:
            checked = build_site(args.out, figures)
            print(f"ok     mkdocs build --strict: {args.out / 'site'}, {checked} images, every link resolves",
                  flush=True)
    except (ExportError, ParamError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
