"""Unit tests of the notebook runner's parameter handling (run by `cargo xtask test`)."""
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parent))
from nbrun import ParamError, declared_parameters, inject, rust_literal  # noqa: E402

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

    def run_cli(self, *params):
        args = [sys.executable, str(NBRUN), "--export-root", str(self.exports), str(self.notebook)]
        for p in params:
            args += ["--param", p]
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

    def test_good_values_run_with_their_types(self):
        r = self.run_cli(
            "ratio=-3.4e38", "lr=2", "small=-128", "shift=-9223372036854775808",
            "seed=18446744073709551615", "count=0", 'label=a "q" \\ 中文', "verbose=true")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        done = nbformat.read(self.exports / "typed" / "typed.ipynb", as_version=4)
        shown = "".join(o.get("text", "") for o in done.cells[-1].outputs if o.output_type == "stream")
        self.assertEqual(
            shown.strip(),
            '-3.4e38 2.0 -128 -9223372036854775808 18446744073709551615 0 "a \\"q\\" \\\\ 中文" true (1, 2)')


if __name__ == "__main__":
    unittest.main()
