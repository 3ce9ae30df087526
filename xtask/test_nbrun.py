"""Unit tests of the notebook runner's parameter handling (run by `cargo xtask test`)."""
import sys
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


if __name__ == "__main__":
    unittest.main()
