"""Execute genlab notebooks headless through the real Jupyter client and the evcxr kernel.

Called by `cargo xtask run` and `cargo xtask test`; not meant to be run by hand.

Parameters follow papermill's convention: the code cell tagged `parameters` holds plain,
typed `let` bindings (`let epochs: usize = 30;`). Overrides (a notebook's smoke parameters
from its metadata `genlab.smoke_parameters`, then `--param NAME=VALUE`) are checked against
those bindings before any cell runs, and go into a new cell tagged `injected-parameters`
right after it, which re-binds them.

A notebook fails on any error output: an `error` message (a compile error) or anything on
stderr (evcxr reports a panic, or an `Err` returned with `?`, on stderr with an "ok" reply).
The executed copy and every figure the notebook displayed go to `<export-root>/<notebook>/`.
"""
import argparse
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

LET = re.compile(r"^\s*let\s+(mut\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*([^=]+?))?\s*=\s*(.+?);\s*(//.*)?$")
INT_TYPES = {"usize", "u8", "u16", "u32", "u64", "isize", "i8", "i16", "i32", "i64"}
FLOAT_TYPES = {"f32", "f64"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Escapes inside a Rust string literal (JSON's \b, \f and \u0001 are not Rust).
RUST_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class ParamError(Exception):
    pass


def parameters_cell(nb):
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return i
    return None


def declared_parameters(source):
    """name -> (type, default literal) for each `let NAME: TYPE = VALUE;` line."""
    params = {}
    for n, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        m = LET.match(line)
        if not m:
            raise ParamError(f"parameters cell, line {n}: `{stripped}` is not a `let NAME: TYPE = VALUE;` binding")
        name, ty, value = m.group(2), (m.group(3) or "").strip(), m.group(4).strip()
        if not ty:
            raise ParamError(
                f"parameters cell, line {n}: `{name}` has no type; write it as `let {name}: TYPE = {value};` "
                "so an override can be re-bound with the same type")
        params[name] = (ty, value)
    return params


def rust_literal(name, ty, value):
    """The Rust literal for `value` as type `ty`, or a ParamError naming the parameter."""
    text = str(value).strip() if not isinstance(value, bool) else ("true" if value else "false")
    bad = f"parameter `{name}` is {ty}; `{text}` is not"
    if ty in INT_TYPES:
        if not re.fullmatch(r"[+-]?\d+", text.replace("_", "")):
            raise ParamError(f"{bad} an integer")
        v = int(text.replace("_", ""))
        if ty.startswith("u") and v < 0:
            raise ParamError(f"{bad} a non-negative integer")
        bits = {"8": 8, "16": 16, "32": 32, "64": 64, "size": 64}[ty[1:]]
        lo, hi = (0, 2**bits - 1) if ty.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if not lo <= v <= hi:
            raise ParamError(f"{bad} in range for {ty} ({lo}..={hi})")
        return str(v)
    if ty in FLOAT_TYPES:
        try:
            v = float(text)
        except ValueError:
            raise ParamError(f"{bad} a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ParamError(f"{bad} a finite number")
        if ty == "f32":
            try:
                struct.pack("<f", v)  # rounds like rustc; fails where the f32 would be infinite
            except OverflowError:
                raise ParamError(f"{bad} in range for f32 (about ±3.4e38)") from None
        literal = repr(v)
        return literal if any(c in literal for c in ".e") else literal + ".0"
    if ty == "bool":
        if text not in ("true", "false"):
            raise ParamError(f"{bad} `true` or `false`")
        return text
    if ty in ("&str", "&'static str", "String"):
        def escape(c):
            control = c < " " or c == "\x7f"
            return RUST_ESCAPES.get(c, f"\\u{{{ord(c):x}}}" if control else c)
        quoted = '"' + "".join(escape(c) for c in str(value)) + '"'
        return quoted if ty != "String" else f"String::from({quoted})"
    raise ParamError(f"parameter `{name}` has type {ty}, which overrides do not support "
                     "(use an integer, f32/f64, bool, &str or String)")


def inject(nb, overrides, path):
    """Validate `overrides` against the parameters cell and insert the injected cell."""
    if not overrides:
        return {}
    index = parameters_cell(nb)
    if index is None:
        raise ParamError(f"{path.name} has no cell tagged `parameters`, so it takes no --param")
    declared = declared_parameters(nb.cells[index].source)
    lines, applied = [], {}
    for name, value in overrides.items():
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ParamError(f"{path.name}: unknown parameter `{name}` (value `{value}`); its parameters are: {known}")
        ty = declared[name][0]
        literal = rust_literal(name, ty, value)
        lines.append(f"let {name}: {ty} = {literal};")
        applied[name] = literal
    cell = nbformat.v4.new_code_cell(
        "// Injected by the genlab runner: these re-bind the parameters above.\n" + "\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return applied


def error_text(cell):
    """The error outputs of an executed cell, as plain text (empty when there are none)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "error":
            tb = "\n".join(out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}"
            parts.append(ANSI.sub("", tb))
        elif out.output_type == "stream" and out.get("name") == "stderr" and out.text.strip():
            parts.append(ANSI.sub("", out.text))
    return "\n".join(parts).strip()


def run_notebook(path, overrides, export_root, kernel, timeout):
    nb = nbformat.read(path, as_version=4)
    applied = inject(nb, overrides, path)
    out_dir = export_root / path.stem
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    os.environ["GENLAB_EXPORT_DIR"] = str(out_dir.resolve())
    os.environ["GENLAB_AUTO_EXPORT"] = "1"
    shown = ", ".join(f"{k}={v}" for k, v in applied.items())
    print(f"== {path}" + (f" (parameters: {shown})" if shown else ""), flush=True)

    client = NotebookClient(nb, kernel_name=kernel, timeout=timeout, startup_timeout=120,
                            allow_errors=True, resources={"metadata": {"path": str(path.parent.resolve())}})
    timings, failure = [], None
    start = time.perf_counter()
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                t0 = time.perf_counter()
                try:
                    client.execute_cell(cell, index)
                except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
                    failure = (index, cell.source, ANSI.sub("", str(e)))
                seconds = time.perf_counter() - t0
                first = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
                timings.append({"cell": index, "seconds": round(seconds, 3), "first_line": first})
                print(f"   cell {index:>3}  {seconds:7.2f} s  {first}", flush=True)
                text = error_text(cell)
                if failure is None and text:
                    failure = (index, cell.source, text)
                if failure:
                    break
    except (DeadKernelError, RuntimeError) as e:
        failure = failure or (None, "", f"the kernel failed: {e}")
    wall = time.perf_counter() - start
    nbformat.write(nb, out_dir / path.name)
    (out_dir / "timings.json").write_text(json.dumps(
        {"notebook": path.name, "wall_seconds": round(wall, 2), "parameters": applied, "cells": timings},
        indent=1))
    figures = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".png", ".svg"))
    if failure:
        index, source, text = failure
        print(f"FAILED {path.name} after {wall:.1f} s, in cell {index}:", file=sys.stderr)
        print("---- cell source ----\n" + source + "\n---- error ----\n" + text, file=sys.stderr)
        return False, wall
    print(f"ok     {path.name}: {wall:.1f} s, {len(figures)} figure files in {out_dir}", flush=True)
    return True, wall


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--smoke", action="store_true", help="apply each notebook's smoke parameters first")
    p.add_argument("--export-root", type=Path, default=Path("exports"))
    p.add_argument("--kernel", default="genlab-rust")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = p.parse_args()

    cli = {}
    for item in args.param:
        if "=" not in item:
            print(f"error: --param `{item}` is not NAME=VALUE", file=sys.stderr)
            sys.exit(2)
        name, value = item.split("=", 1)
        cli[name.strip()] = value.strip()

    # Check every notebook's parameters before any cell of any notebook runs.
    plans, known = [], set()
    try:
        for path in args.notebooks:
            nb = nbformat.read(path, as_version=4)
            index = parameters_cell(nb)
            declared = declared_parameters(nb.cells[index].source) if index is not None else {}
            known |= set(declared)
            overrides = dict(nb.metadata.get("genlab", {}).get("smoke_parameters", {})) if args.smoke else {}
            overrides.update({k: v for k, v in cli.items() if k in declared})
            inject(nbformat.read(path, as_version=4), overrides, path)  # validates types and names
            plans.append((path, overrides))
        unknown = sorted(set(cli) - known)
        if unknown:
            raise ParamError(f"unknown parameter `{unknown[0]}` (value `{cli[unknown[0]]}`): "
                             f"the notebooks run here take: {', '.join(sorted(known)) or 'none'}")
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # xtask reports exit status 2 as a bad parameter, before any cell ran

    passed = failed = 0
    for path, overrides in plans:
        ok, _ = run_notebook(path, overrides, args.export_root, args.kernel, args.timeout)
        passed, failed = passed + ok, failed + (not ok)
    print(f"notebooks: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
