"""Unit tests of the notebook runner: parameter handling, and how it decides that a cell failed
(run by `cargo xtask test`)."""
import sys
import unittest
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))
from nbrun import (RAISES, ParamError, completed, declared_parameters, inject, instrument,  # noqa: E402
                   rust_literal, stdout_text, verdict)

CELL = """// comment
let epochs: usize = 30;   // trailing comment
let lr: f64 = 1e-3;
let name: &str = "digits";
let verbose: bool = false;
let shift: i32 = -2;
"""


def notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(":dep genlab"), nbformat.v4.new_code_cell(CELL)]
    nb.cells[1].metadata["tags"] = ["parameters"]
    return nb


class Parameters(unittest.TestCase):
    def test_declared(self):
        self.assertEqual(declared_parameters(CELL)["epochs"], ("usize", "30"))
        self.assertEqual(declared_parameters(CELL)["lr"], ("f64", "1e-3"))
        self.assertEqual(len(declared_parameters(CELL)), 5)

    def test_untyped_binding_is_refused(self):
        with self.assertRaisesRegex(ParamError, "`epochs` has no type"):
            declared_parameters("let epochs = 30;")

    def test_literals(self):
        self.assertEqual(rust_literal("epochs", "usize", "2"), "2")
        self.assertEqual(rust_literal("lr", "f64", "2"), "2.0")
        self.assertEqual(rust_literal("lr", "f64", "0.0005"), "0.0005")
        self.assertEqual(rust_literal("shift", "i32", "-5"), "-5")
        self.assertEqual(rust_literal("name", "&str", 'a "b"'), '"a \\"b\\""')
        self.assertEqual(rust_literal("verbose", "bool", True), "true")

    def test_bad_values_name_the_parameter(self):
        for name, ty, value, message in [
            ("epochs", "usize", "abc", "`epochs` is usize; `abc` is not an integer"),
            ("epochs", "usize", "-1", "non-negative"),
            ("epochs", "u8", "300", "in range"),
            ("lr", "f64", "fast", "`lr` is f64; `fast` is not a number"),
            ("lr", "f64", "nan", "finite"),
            ("verbose", "bool", "yes", "`true` or `false`"),
        ]:
            with self.assertRaisesRegex(ParamError, message):
                rust_literal(name, ty, value)

    def test_injected_cell_follows_the_parameters_cell(self):
        nb = notebook()
        applied = inject(nb, {"epochs": "2", "lr": "0.01"}, Path("x.ipynb"))
        self.assertEqual(applied, {"epochs": "2", "lr": "0.01"})
        self.assertEqual(nb.cells[2].metadata["tags"], ["injected-parameters"])
        self.assertIn("let epochs: usize = 2;", nb.cells[2].source)
        self.assertIn("let lr: f64 = 0.01;", nb.cells[2].source)

    def test_unknown_parameter_lists_the_known_ones(self):
        with self.assertRaisesRegex(ParamError, "unknown parameter `epoch`.*epochs, lr"):
            inject(notebook(), {"epoch": "2"}, Path("x.ipynb"))


def executed(source, *outputs, tags=(), expect=None):
    """A code cell as nbclient leaves it, with `outputs` given as (kind, text) pairs."""
    cell = nbformat.v4.new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    if expect:
        cell.metadata["genlab"] = {"expect_error": expect}
    for kind, text in outputs:
        if kind == "error":
            cell.outputs.append(nbformat.v4.new_output("error", ename="Error", evalue=text, traceback=[text]))
        else:
            cell.outputs.append(nbformat.v4.new_output("stream", name=kind, text=text))
    return cell


class Instrument(unittest.TestCase):
    def test_marker_goes_in_front_of_the_first_line_of_code(self):
        self.assertEqual(instrument("let a = 1;\na", 7),
                         "let genlab_cell_ran: [(); 7] = [(); 7]; let a = 1;\na")

    def test_line_numbers_are_kept(self):
        source = "use genlab::prelude::*;\n/// doc\nfn f() {}\nf()"
        self.assertEqual(instrument(source, 3).count("\n"), source.count("\n"))

    def test_marker_goes_after_leading_commands(self):
        code = instrument(':dep genlab = { path = ".." }\n:opt 0\nuse genlab::prelude::*;', 2)
        self.assertEqual(code.split("\n")[:2], [':dep genlab = { path = ".." }', ":opt 0"])
        self.assertTrue(code.split("\n")[2].startswith("let genlab_cell_ran: [(); 2] = [(); 2]; use genlab"))

    def test_cells_of_commands_and_comments_only_are_not_probed(self):
        self.assertIsNone(instrument(":dep genlab = { path = \"..\" }\n// nothing else\n", 1))
        self.assertIsNone(instrument("", 1))

    def test_completed_reads_the_vars_listing(self):
        listing = "genlab_cell_ran: [(); 12]\nvae: Vae\n"
        self.assertTrue(completed(listing, 12))
        self.assertFalse(completed(listing, 13))  # an earlier cell's marker is not this one's
        self.assertFalse(completed("vae: Vae\n", 13))
        self.assertFalse(completed("", 1))


class Verdict(unittest.TestCase):
    def test_a_passing_cell(self):
        self.assertIsNone(verdict(executed("1", ("stdout", "1\n")), True))
        self.assertIsNone(verdict(executed(":dep x"), None))

    def test_a_cell_that_stopped_early_fails_even_when_its_stderr_was_lost(self):
        why = verdict(executed("f()?;"), False)
        self.assertRegex(why, "stopped before its end.*never arrived")

    def test_stderr_and_compile_errors_fail_a_cell(self):
        self.assertEqual(verdict(executed("f()?;", ("stderr", "lr must be > 0\n")), False), "lr must be > 0")
        self.assertIn("mismatched types", verdict(executed("x", ("error", "mismatched types")), False))
        # stderr from a cell that did run to its end still fails it
        self.assertEqual(verdict(executed("eprintln!()", ("stderr", "warning\n")), True), "warning")

    def test_a_tagged_cell_must_stop_with_its_error(self):
        ok = executed("v.train(0)?;", ("stderr", "epochs must be at least 1\n"), tags=[RAISES])
        self.assertIsNone(verdict(ok, False))

    def test_a_tagged_cell_that_runs_to_its_end_fails(self):
        self.assertRegex(verdict(executed("v.train(1)?;", tags=[RAISES]), True), "ran to its end without an error")
        noisy = executed("eprintln!(\"x\");", ("stderr", "x\n"), tags=[RAISES])
        self.assertRegex(verdict(noisy, True), "ran to its end; it wrote to stderr")

    def test_a_tagged_cell_that_does_not_compile_fails(self):
        cell = executed("v.trian(0)?;", ("error", "no method named `trian`"), tags=[RAISES])
        self.assertRegex(verdict(cell, False), "must run and return an error, but:\nno method named")

    def test_a_tagged_cell_whose_message_was_lost_fails(self):
        self.assertRegex(verdict(executed("f()?;", tags=[RAISES]), False), "never arrived")

    def test_a_tagged_cell_must_give_the_expected_message(self):
        cell = executed("f()?;", ("stderr", "file not found\n"), tags=[RAISES], expect="lr")
        self.assertRegex(verdict(cell, False), "should contain `lr`")
        cell = executed("f()?;", ("stderr", "lr = -1 must be > 0\n"), tags=[RAISES], expect="lr")
        self.assertIsNone(verdict(cell, False))

    def test_stdout_text(self):
        cells = [executed("a", ("stdout", "one\n"), ("stderr", "x\n")), executed("b", ("stdout", "two\n"))]
        self.assertEqual(stdout_text(cells), "one\ntwo\n")


if __name__ == "__main__":
    unittest.main()
