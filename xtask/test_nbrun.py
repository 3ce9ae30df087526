"""Unit tests of the notebook runner: parameter handling, and how it decides that a cell failed
(run by `cargo xtask test`)."""
import queue
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))
import nbrun  # noqa: E402
from nbrun import (RAISES, CellRunner, ParamError, completed, declared_parameters, inject, instrument,  # noqa: E402
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

    def test_each_supported_type_at_its_limits(self):
        for ty, value, literal in [
            ("f32", "3.4e38", "3.4e+38"),
            ("f32", "-1e-50", "-1e-50"),  # underflows to −0 in f32: allowed, like rustc
            ("f64", "1.7e308", "1.7e+308"),
            ("i8", "-128", "-128"),
            ("i8", "127", "127"),
            ("i16", "-32768", "-32768"),
            ("i32", "-2147483648", "-2147483648"),
            ("i64", "-9223372036854775808", "-9223372036854775808"),
            ("isize", "9223372036854775807", "9223372036854775807"),
            ("u8", "255", "255"),
            ("u64", "18446744073709551615", "18446744073709551615"),
            ("usize", "1_000", "1000"),
            ("bool", "false", "false"),
            ("String", 'a "b" \\ 中文', 'String::from("a \\"b\\" \\\\ 中文")'),
            ("&str", "x", '"x"'),
        ]:
            self.assertEqual(rust_literal("p", ty, value), literal, f"{ty} {value}")

    def test_values_out_of_their_types_range_are_refused(self):
        for ty, value in [
            ("f32", "3.5e38"),
            ("f32", "-1e39"),
            ("f64", "1e309"),
            ("i8", "128"),
            ("i8", "-129"),
            ("i32", "2147483648"),
            ("i64", "-9223372036854775809"),
            ("u64", "18446744073709551616"),
            ("u8", "-1"),
            ("usize", "1.5"),
        ]:
            with self.assertRaisesRegex(ParamError, f"parameter `p` is {ty}; `{value}` is not", msg=f"{ty} {value}"):
                rust_literal("p", ty, value)

    def test_strings_become_valid_rust_literals(self):
        # Rust knows \n \r \t \\ \" and \u{..}; JSON's \b, \f and \u0001 are not Rust.
        self.assertEqual(rust_literal("p", "&str", "a\nb\tc"), '"a\\nb\\tc"')
        self.assertEqual(rust_literal("p", "&str", "a\x01\x0c\x7f"), '"a\\u{1}\\u{c}\\u{7f}"')

    def test_unsupported_types_are_named(self):
        for ty in ["(usize, usize)", "Vec<f32>", "u128", "char", "Option<f64>"]:
            with self.assertRaisesRegex(ParamError, re.escape(f"has type {ty}, which overrides do not support")):
                rust_literal("p", ty, "1")


NBRUN = Path(__file__).parent / "nbrun.py"
TYPED = """let ratio: f32 = 0.5;
let lr: f64 = 1e-3;
let small: i8 = 0;
let shift: i64 = 0;
let seed: u64 = 0;
let count: usize = 1;
let label: String = String::from("x");
let verbose: bool = false;
let pair: (usize, usize) = (1, 2);
"""
SHOW = 'println!("{ratio:?} {lr:?} {small} {shift} {seed} {count} {label:?} {verbose} {pair:?}");'


class CommandLine(unittest.TestCase):
    """`nbrun.py NOTEBOOK --param NAME=VALUE`: exit status 2 and no cell run for a bad value, 0
    and the value bound with its type for a good one."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        root = Path(self.dir.name)
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(TYPED), nbformat.v4.new_code_cell(SHOW)]
        nb.cells[0].metadata["tags"] = ["parameters"]
        self.notebook = root / "typed.ipynb"
        nbformat.write(nb, self.notebook)
        self.exports = root / "exports"

    def tearDown(self):
        self.dir.cleanup()

    def run_cli(self, *params, edits=()):
        args = [sys.executable, str(NBRUN), "--export-root", str(self.exports),
                "--edit-root", str(self.exports / "edits"), str(self.notebook)]
        for p in params:
            args += ["--param", p]
        for e in edits:
            args += ["--edit", e]
        return subprocess.run(args, capture_output=True, text=True, timeout=600)

    def test_bad_values_exit_2_before_any_cell_runs(self):
        for param, message in [
            ("ratio=1e39", "`ratio` is f32; `1e39` is not in range"),
            ("ratio=fast", "`ratio` is f32; `fast` is not a number"),
            ("lr=inf", "`lr` is f64; `inf` is not a finite number"),
            ("small=128", "`small` is i8; `128` is not in range"),
            ("small=-129", "`small` is i8; `-129` is not in range"),
            ("shift=9223372036854775808", "`shift` is i64"),
            ("seed=18446744073709551616", "`seed` is u64"),
            ("seed=-1", "`seed` is u64; `-1` is not a non-negative integer"),
            ("count=2.5", "`count` is usize; `2.5` is not an integer"),
            ("verbose=yes", "`verbose` is bool; `yes` is not `true` or `false`"),
            ("pair=3", "`pair` has type (usize, usize), which overrides do not support"),
            ("seeed=1", "unknown parameter `seeed`"),
            ("seed", "is not NAME=VALUE"),
        ]:
            r = self.run_cli(param)
            self.assertEqual(r.returncode, 2, f"{param}: {r.stderr}")
            self.assertIn(message, r.stderr, param)
            self.assertFalse(self.exports.exists(), f"{param}: a cell ran")
        # An edit's values are checked before any cell runs too.
        for edit, message in [
            ("typed count=2.5", "`count` is usize; `2.5` is not an integer"),
            ("typed seeed=1", "unknown parameter `seeed`"),
            ("typed seed", "is not NAME=VALUE"),
            ("other seed=1", "no notebook `other`"),
        ]:
            r = self.run_cli(edits=[edit])
            self.assertEqual(r.returncode, 2, f"{edit}: {r.stderr}")
            self.assertIn(message, r.stderr, edit)
            self.assertFalse(self.exports.exists(), f"{edit}: a cell ran")

    def test_good_values_run_with_their_types(self):
        # Then, in the same kernel, two edits (on top of the --param values), each into its own
        # folder: the kernel reads the runner's file, not the environment it started with.
        r = self.run_cli(
            "ratio=-3.4e38", "lr=2", "small=-128", "shift=-9223372036854775808",
            "seed=18446744073709551615", "count=0", 'label=a "q" \\ 中文', "verbose=true",
            edits=["typed count=3 verbose=false", "typed seed=7"])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

        def shown(path):
            done = nbformat.read(path, as_version=4)
            return "".join(o.get("text", "") for o in done.cells[-1].outputs
                           if o.output_type == "stream").strip()
        self.assertEqual(
            shown(self.exports / "typed" / "typed.ipynb"),
            '-3.4e38 2.0 -128 -9223372036854775808 18446744073709551615 0 "a \\"q\\" \\\\ 中文" true (1, 2)')
        self.assertEqual(
            shown(self.exports / "edits" / "0" / "typed" / "typed.ipynb"),
            '-3.4e38 2.0 -128 -9223372036854775808 18446744073709551615 3 "a \\"q\\" \\\\ 中文" false (1, 2)')
        self.assertRegex(shown(self.exports / "edits" / "1" / "typed" / "typed.ipynb"), r"^\S+ \S+ -128 \S+ 7 0 ")
        self.assertIn("again in the same kernel (lenient", r.stdout)
        runner_file = (self.exports / ".genlab-runner-typed").read_text()
        self.assertIn(f"export_dir={(self.exports / 'edits' / '1' / 'typed').resolve()}", runner_file)
        self.assertIn("strict=0", runner_file)


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

    def test_command_lines_count_only_before_the_first_line_of_code(self):
        # evcxr takes `:` and `!` lines as commands only at the top of a cell: later they are Rust.
        for source in ["let x = 1;\n::std::mem::drop(x);", "let ok = f();\nlet b = g() &&\n!ok;"]:
            code = instrument(source, 4)
            self.assertTrue(code.startswith("let genlab_cell_ran: [(); 4] = [(); 4]; let "), code)
        code = instrument("// setup\n:dep genlab\n\n:opt 0\nlet a = 1;\n::std::mem::drop(a);", 5)
        self.assertEqual(code.split("\n")[4], "let genlab_cell_ran: [(); 5] = [(); 5]; let a = 1;")

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

    def test_a_cell_whose_value_is_an_err_fails(self):
        cell = executed("v.train(0)")
        cell.outputs.append(nbformat.v4.new_output(
            "execute_result", data={"text/plain": "Err(Param { name: \"epochs\" })"}, execution_count=1))
        self.assertRegex(verdict(cell, True), "value is an `Err`.*\n.*epochs")
        ok = executed("v.train(1)")
        ok.outputs.append(nbformat.v4.new_output("execute_result", data={"text/plain": "Ok(())"},
                                                 execution_count=1))
        self.assertIsNone(verdict(ok, True))

    def test_figure_errors_are_read_from_the_export_folder_as_they_grow(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.assertEqual(nbrun.new_figure_errors(tmp, 0), ("", 0))
            path = Path(tmp) / nbrun.FIGURE_ERRORS
            path.write_text("the figure could not be drawn: series `y`\n")
            text, seen = nbrun.new_figure_errors(tmp, 0)
            self.assertIn("series `y`", text)
            self.assertEqual(nbrun.new_figure_errors(tmp, seen), ("", seen))  # nothing new
            with path.open("a") as f:
                f.write("could not export 03-x.png: disk full\n")
            self.assertEqual(nbrun.new_figure_errors(tmp, seen)[0], "could not export 03-x.png: disk full")

    def test_the_figure_errors_file_is_the_crates(self):
        plot_rs = (Path(__file__).parent.parent / "src/plot.rs").read_text()
        self.assertIn(f'pub const FIGURE_ERRORS: &str = "{nbrun.FIGURE_ERRORS}";', plot_rs)

    def test_stdout_text(self):
        cells = [executed("a", ("stdout", "one\n"), ("stderr", "x\n")), executed("b", ("stdout", "two\n"))]
        self.assertEqual(stdout_text(cells), "one\ntwo\n")

    def test_demonstration_notes_are_read_from_stdout_only(self):
        note = f"{nbrun.DEMO_NOTE}: JS 0.05 -> 0.06"
        cell = executed("demo(..)?;", ("stdout", f"x = 1\n{note}\n    为什么 (why): ...\n"),
                        ("stderr", f"{nbrun.DEMO_NOTE}: not a note\n"))
        self.assertEqual(nbrun.demo_notes(cell), [note])
        self.assertEqual(nbrun.demo_notes(executed("a", ("stdout", "ok\n"))), [])

    def test_the_note_marker_is_the_crates(self):
        error_rs = (Path(__file__).parent.parent / "src/error.rs").read_text()
        self.assertIn(f'pub const DEMO_NOTE: &str = "{nbrun.DEMO_NOTE}";', error_rs)


class FakeEvcxr:
    """A kernel client that behaves like evcxr 0.22 as the runner sees it: a cell whose code
    contains `fails` stops early (its marker variable is not kept) and its stderr line comes
    after its idle status, or never when the code contains `silently`; `:vars` lists the
    markers of the cells that ran to their end."""

    def __init__(self):
        self.sent, self.iopub, self.shell, self.vars = 0, [], [], {}
        self.iopub_channel, self.shell_channel = self.Channel(self.iopub), self.Channel(self.shell)

    class Channel:
        def __init__(self, messages):
            self.messages = messages

        async def get_msg(self, timeout=None):
            if not self.messages:
                raise queue.Empty
            return self.messages.pop(0)

    def msg(self, parent, kind, **content):
        return {"parent_header": {"msg_id": parent}, "msg_type": kind, "header": {"msg_type": kind},
                "content": content}

    def execute(self, code, **kwargs):
        self.sent += 1
        mid = f"request-{self.sent}"
        idle = self.msg(mid, "status", execution_state="idle")
        if code == ":vars":
            listing = "".join(f"{k}: {v}\n" for k, v in self.vars.items())
            self.iopub += [self.msg(mid, "execute_result", data={"text/plain": listing}, metadata={},
                                    execution_count=self.sent), idle]
        else:
            m = re.match(r"let (genlab_cell_ran): (\[\(\); \d+\])", code)
            if "fails" in code:
                self.vars.pop("genlab_cell_ran", None)
                # The stream stamped with the previous request, as evcxr does: a late line.
                self.iopub.append(self.msg("request-0", "stream", name="stderr", text="another cell's line\n"))
                self.iopub.append(idle)
                if "silently" not in code:
                    self.iopub.append(self.msg(mid, "stream", name="stderr", text="boom\n"))
            else:
                if m:
                    self.vars[m.group(1)] = m.group(2)
                self.iopub += [self.msg(mid, "stream", name="stdout", text="fine\n"), idle]
        self.shell.append(self.msg(mid, "execute_reply", status="ok"))
        return mid


class FakeClient:
    """Just enough of nbclient's NotebookClient: execute_cell reads the cell's messages up to its
    idle status and drops the rest, as nbclient does."""
    timeout = 5

    def __init__(self):
        self.kc = FakeEvcxr()

    def process_message(self, msg, cell, index):
        cell.outputs.append(nbformat.v4.output_from_msg(msg))

    def execute_cell(self, cell, index):
        mid = self.kc.execute(cell.source)
        while True:
            msg = self.kc.iopub.pop(0)
            if msg["parent_header"]["msg_id"] != mid:
                continue
            if msg["msg_type"] == "status":
                break
            self.process_message(msg, cell, index)
        self.kc.shell.pop(0)


class Probe(unittest.TestCase):
    def setUp(self):
        self.wait, nbrun.ERROR_WAIT = nbrun.ERROR_WAIT, 0.2

    def tearDown(self):
        nbrun.ERROR_WAIT = self.wait

    def test_a_cell_that_runs_to_its_end(self):
        runner, cell = CellRunner(FakeClient()), executed("let a = 1;")
        probe = runner.run(cell, 0)
        self.assertEqual((probe["ran_to_end"], probe["error_at_idle"]), (True, False))
        self.assertEqual(cell.source, "let a = 1;")  # the notebook keeps the learner's code
        self.assertIsNone(verdict(cell, probe["ran_to_end"]))

    def test_a_late_message_is_read_back_into_its_cell(self):
        runner, cell = CellRunner(FakeClient()), executed("x.fails()?;")
        probe = runner.run(cell, 0)
        self.assertEqual((probe["ran_to_end"], probe["error_at_idle"]), (False, False))
        self.assertEqual(verdict(cell, probe["ran_to_end"]), "boom")  # not another cell's line

    def test_a_lost_message_still_fails_the_cell(self):
        runner, cell = CellRunner(FakeClient()), executed("x.fails()?; // silently")
        probe = runner.run(cell, 0)
        self.assertFalse(probe["ran_to_end"])
        self.assertRegex(verdict(cell, probe["ran_to_end"]), "stopped before its end")

    def test_an_earlier_cells_marker_does_not_pass_a_later_cell(self):
        runner = CellRunner(FakeClient())
        self.assertTrue(runner.run(executed("let a = 1;"), 0)["ran_to_end"])
        self.assertFalse(runner.run(executed("x.fails()?;"), 1)["ran_to_end"])
        self.assertTrue(runner.run(executed("let b = 2;"), 2)["ran_to_end"])


if __name__ == "__main__":
    unittest.main()
