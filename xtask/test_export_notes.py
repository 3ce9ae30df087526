"""Unit tests of the notes exporter (run by `cargo xtask test`): pages, stable figure names, the
MkDocs build and its link check, on small executed notebooks made here (no kernel)."""
import json
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))
from export_notes import (  # noqa: E402
    FIGURE_MIME, ExportError, assign_stems, broken_links, build_site, export, fence, figure_stem,
    run_problems, unlink_repository_files)

SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'
# A 1x1 PNG.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c63000100000500010d0a2db40000000049454e44ae426082")


def figure_cell(title, files, count, name=None):
    cell = nbformat.v4.new_code_cell(f'Figure::new("{title}")')
    cell.execution_count = count
    record = {"title": title, "name": name, "files": files}
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"image/svg+xml": SVG, FIGURE_MIME: record},
                                           execution_count=count)]
    return cell


def chapter(figures, inserted=None):
    """An executed chapter: heading, setup, parameters, injected parameters, a printing cell,
    then one cell per figure title; `inserted` adds a figure cell right after the parameters."""
    nb = nbformat.v4.new_notebook()
    setup = nbformat.v4.new_code_cell(':dep genlab = { path = ".." }\nuse genlab::prelude::*;')
    params = nbformat.v4.new_code_cell("let flips: usize = 100; // 抛硬币次数\nlet lr: f64 = 0.5;")
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell("// Injected by the genlab runner\nlet flips: usize = 40;")
    injected.metadata["tags"] = ["injected-parameters"]
    printing = nbformat.v4.new_code_cell('println!("{flips} 次抛掷");')
    printing.outputs = [nbformat.v4.new_output("stream", name="stdout", text="40 次抛掷\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# 第一章 先验 (prior)\n\n贝叶斯：$$p(\\theta|x)$$ 与 $x$。"),
                setup, params, injected, printing]
    if inserted:
        nb.cells.append(figure_cell(inserted, "00-inserted", 0))
    for i, title in enumerate(figures):
        nb.cells.append(figure_cell(title, f"{i + 1 + bool(inserted):02}-x", i + 10))
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.execution_count is None:
            cell.execution_count = i
    return nb


class Names(unittest.TestCase):
    def test_stems_keep_chinese_and_lower_ascii(self):
        self.assertEqual(figure_stem("先验与后验 (prior and posterior)"), "先验与后验-prior-and-posterior")
        self.assertEqual(figure_stem("判别器的输出：真实样本 vs 生成样本"), "判别器的输出-真实样本-vs-生成样本")
        self.assertEqual(figure_stem("q(x_t | x_0)"), "q-x-t-x-0")
        self.assertEqual(figure_stem("  ++ "), "")

    def test_a_name_wins_and_repeats_are_numbered_by_title(self):
        stems = assign_stems([{"title": "A"}, {"title": "B", "name": "my-b"}, {"title": "A"}, {"title": "?"}])
        self.assertEqual(stems, ["a", "my-b", "a-2", "figure"])

    def test_inserting_a_figure_keeps_the_other_names(self):
        titles = [{"title": t} for t in ["先验 (prior)", "后验 (posterior)", "先验 (prior)"]]
        before = assign_stems(titles)
        after = assign_stems([{"title": "新图 (new)"}] + titles)
        self.assertEqual(after[1:], before)

    def test_links_into_the_repository_keep_only_their_text(self):
        # mkdocs --strict fails on a link to ../tests/vae.rs: the notes have no tests/ folder.
        text = "见 [`tests/vae.rs`](../tests/vae.rs) 和 [论文](https://arxiv.org/abs/1312.6114)。"
        self.assertEqual(unlink_repository_files(text),
                         "见 `tests/vae.rs` 和 [论文](https://arxiv.org/abs/1312.6114)。")

    def test_fence_outgrows_backticks_inside(self):
        self.assertTrue(fence("a ``` b", "text").startswith("````text\n"))


class Pages(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp)

    def executed(self, nb, files):
        """Writes `nb` as exports/01_bayes/01_bayes.ipynb with the runner's figure files."""
        run = self.tmp / "exports/01_bayes"
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        nbformat.write(nb, run / "01_bayes.ipynb")
        for stem in files:
            (run / f"{stem}.svg").write_text(SVG)
            (run / f"{stem}.png").write_bytes(PNG)
        return Path("notebooks/01_bayes.ipynb")

    def test_page_shape(self):
        notebook = self.executed(chapter(["先验 (prior)"]), ["01-x"])
        self.assertEqual(export([notebook], self.tmp / "exports", self.tmp / "notes", quiet=True), 1)
        page = (self.tmp / "notes/docs/01_bayes.md").read_text()
        # The parameters come right under the title, with the override marked.
        self.assertLess(page.index("# 第一章"), page.index("| `flips` | `usize` | `40`（已覆盖） | `100` |"))
        self.assertLess(page.index("`flips`"), page.index("贝叶斯"))
        self.assertIn("| `lr` | `f64` | `0.5` | `0.5` |", page)
        self.assertIn("$$p(\\theta|x)$$ 与 $x$", page)
        self.assertIn('??? note "设置 (setup)"\n\n    ```rust\n    :dep genlab', page)
        self.assertIn('??? note "本次运行注入的参数 (injected parameters)"\n\n    ```rust\n', page)
        self.assertIn("```rust\nlet flips: usize = 100;", page)
        self.assertIn("```text\n40 次抛掷\n```", page)
        self.assertIn("![先验 (prior)](assets/01_bayes/先验-prior.png)", page)
        self.assertIn("<figcaption>先验 (prior)</figcaption>", page)
        assets = self.tmp / "notes/docs/assets/01_bayes"
        self.assertEqual(sorted(p.name for p in assets.iterdir()), ["先验-prior.png", "先验-prior.svg"])
        yml = (self.tmp / "notes/mkdocs.yml").read_text()
        self.assertIn("name: material", yml)
        self.assertIn("pymdownx.arithmatex", yml)
        self.assertIn('"第一章 先验 (prior)": 01_bayes.md', yml)

    def test_rerun_with_an_inserted_cell_keeps_file_names(self):
        titles = ["先验 (prior)", "后验 (posterior)"]
        notebook = self.executed(chapter(titles), ["01-x", "02-x"])
        export([notebook], self.tmp / "exports", self.tmp / "notes", quiet=True)
        assets = self.tmp / "notes/docs/assets/01_bayes"
        before = sorted(p.name for p in assets.iterdir())
        # The runner's numbered files shift by one; the exported names must not.
        notebook = self.executed(chapter(titles, inserted="新图 (new)"), ["00-inserted", "02-x", "03-x"])
        export([notebook], self.tmp / "exports", self.tmp / "notes", quiet=True)
        after = sorted(p.name for p in assets.iterdir())
        self.assertEqual(sorted(set(after) - set(before)), ["新图-new.png", "新图-new.svg"])
        self.assertTrue(set(before) <= set(after))

    def test_site_builds_strict_and_links_resolve(self):
        notebook = self.executed(chapter(["先验 (prior)", "后验 (posterior)"]), ["01-x", "02-x"])
        export([notebook], self.tmp / "exports", self.tmp / "notes", quiet=True)
        self.assertEqual(build_site(self.tmp / "notes", 2), 2)
        # The checker sees a missing image.
        (self.tmp / "notes/site/assets/01_bayes/后验-posterior.png").unlink()
        broken, _ = broken_links(self.tmp / "notes/site")
        self.assertEqual(len(broken), 1)
        self.assertIn("%E5%90%8E%E9%AA%8C-posterior.png", broken[0][1])
        with self.assertRaisesRegex(ExportError, "3 figures"):
            build_site(self.tmp / "notes", 3)


class Reuse(unittest.TestCase):
    def test_a_clean_run_is_reusable(self):
        self.assertEqual(run_problems(chapter(["a"])), [])

    def test_problems(self):
        nb = chapter(["a"])
        nb.cells[4].outputs.append(nbformat.v4.new_output("stream", name="stderr", text="Error: bad"))
        self.assertIn("cell 4 has error output", run_problems(nb))
        nb = chapter(["a"])
        del nb.cells[5].outputs[0]["data"][FIGURE_MIME]
        self.assertIn("older run", run_problems(nb)[0])
        nb = chapter(["a"])
        nb.cells[5].execution_count = None
        self.assertEqual(run_problems(nb), ["cell 5 did not run"])

    def test_the_runs_own_records_count(self):
        # The runner's verdict (a cell that stopped early, its message lost: no error output in
        # the copy), the pass line, a figure not drawn, a figure that could not be exported.
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            nb = chapter(["a"])
            (folder / "timings.json").write_text(json.dumps({"cells": [
                {"cell": 4, "failed": False}, {"cell": 5, "failed": True}]}))
            self.assertEqual(run_problems(nb, folder), ["the runner failed cell 5 in that run"])
            (folder / "timings.json").write_text(json.dumps({"cells": [{"cell": 5, "failed": False}]}))
            self.assertEqual(run_problems(nb, folder), [])
            (folder / "genlab-figure-errors.txt").write_text("could not export 01-a.png: disk full\n")
            self.assertIn("could not be drawn or exported", run_problems(nb, folder)[0])
        nb = chapter(["a"])
        nb.metadata["genlab"] = {"require_stdout": "all checks passed"}
        self.assertEqual(run_problems(nb), ["it never printed its pass line `all checks passed`"])
        nb.cells[4].outputs.append(nbformat.v4.new_output("stream", name="stdout", text="all checks passed\n"))
        self.assertEqual(run_problems(nb), [])
        nb.cells[4].outputs.append(nbformat.v4.new_output(
            "execute_result", data={"text/plain": "figure not drawn: series `y`"}, execution_count=1))
        self.assertEqual(run_problems(nb), ["cell 4 has a figure that was not drawn"])

    def test_a_run_with_problems_is_not_exported(self):
        # A figure never drawn leaves no image for the site's count to miss: the export refuses.
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            nb = chapter(["a"])
            nb.cells[4].outputs.append(nbformat.v4.new_output(
                "execute_result", data={"text/plain": "figure not drawn: series `y`"}, execution_count=1))
            (tmp / "exports/01_x").mkdir(parents=True)
            nbformat.write(nb, tmp / "exports/01_x/01_x.ipynb")
            with self.assertRaisesRegex(ExportError, "not drawn"):
                export([tmp / "01_x.ipynb"], tmp / "exports", tmp / "notes", quiet=True)


if __name__ == "__main__":
    unittest.main()
