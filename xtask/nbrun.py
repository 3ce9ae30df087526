"""Execute genlab notebooks headless through the real Jupyter client and the evcxr kernel.

Called by `cargo xtask run` and `cargo xtask test`; not meant to be run by hand.

Parameters follow papermill's convention: the code cell tagged `parameters` holds plain,
typed `let` bindings (`let epochs: usize = 30;`). Overrides (a notebook's smoke parameters
from its metadata `genlab.smoke_parameters`, then `--param NAME=VALUE`) are checked against
those bindings before any cell runs, and go into a new cell tagged `injected-parameters`
right after it, which re-binds them.

A notebook fails on any error output (an `error` message, i.e. a compile error, or anything
on stderr) and on any cell that did not run to its end. evcxr reports a panic or an `Err`
returned with `?` only on stderr, with an "ok" reply, and sends stderr from another thread, so
the cell's idle status can come first and the message late or never; the runner therefore
does not rely on it: each cell's code runs with `let genlab_cell_ran: [(); N] = [(); N];` in
front of its first line, which evcxr keeps only if the cell completes, and `:vars` after the
cell says whether it did (see `instrument`). A cell also fails when its value is an `Err(..)` (its
last expression was a failed `Result`, displayed instead of stopping the cell), and when one of
its figures could not be drawn or exported (genlab records that in the export folder's
`genlab-figure-errors.txt` before the cell ends; see `plot::FIGURE_ERRORS`). A cell tagged
`raises-error` must instead stop with an error message (containing its metadata `genlab.expect_error`, if given), and a
notebook whose metadata names `genlab.require_stdout` must print that line.
The executed copy and every figure the notebook displayed go to `<export-root>/<notebook>/`.
"""
import argparse
import json
import os
import queue
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import nbformat
from jupyter_core.utils import ensure_async, run_sync
from nbclient import NotebookClient
from nbclient.exceptions import (CellExecutionComplete, CellExecutionError, CellTimeoutError,
                                DeadKernelError)

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


MARKER = "genlab_cell_ran"
MARKER_LINE = re.compile(r"^genlab_cell_ran: \[\(\); (\d+)\]$", re.M)
COMMAND_LINE = re.compile(r"^ *:|^!")
RAISES = "raises-error"
# The first words of a demonstration's note (genlab::DEMO_NOTE, src/error.rs).
DEMO_NOTE = "⚠ 演示没有成立 (demonstration did not hold)"
# genlab's `plot::FIGURE_ERRORS`: the export folder's record of figures that could not be drawn
# or exported, written by the cell itself (so it is there when the cell's reply comes).
FIGURE_ERRORS = "genlab-figure-errors.txt"
# Lines evcxr takes as commands: only at the top of a cell, before its first line of code.
COMMENT_OR_BLANK = re.compile(r"^\s*(//.*)?$")
# How long a failed cell's error message may take to arrive after the cell's reply.
ERROR_WAIT = 10.0


def instrument(source, n):
    """The code the kernel runs for a cell: `source` with `let genlab_cell_ran: [(); n] = [(); n];`
    in front of its first line of Rust code (after any leading `:dep`-style commands, on the same
    line, so compile errors keep their line numbers). None when the cell holds only commands.

    evcxr keeps a variable defined in a cell only when the cell runs to its end: an `Err`
    returned with `?`, a panic or a compile error drops it. `:vars` after the cell then says
    whether it completed, whatever happened to its stderr."""
    lines = source.split("\n")
    # Commands count only in the cell's leading block of commands, comments and blank lines:
    # after the first line of code, a line starting with `:` or `!` is Rust (`::std::…`, `!ok`).
    last_command = -1
    for i, line in enumerate(lines):
        if COMMAND_LINE.match(line):
            last_command = i
        elif not COMMENT_OR_BLANK.match(line):
            break
    rest = lines[last_command + 1:]
    if not any(line.strip() and not line.lstrip().startswith("//") for line in rest):
        return None
    at = last_command + 1
    lines[at] = f"let {MARKER}: [(); {n}] = [(); {n}]; " + lines[at]
    return "\n".join(lines)


def completed(vars_text, n):
    """Whether evcxr's `:vars` listing shows the marker of run `n`."""
    return any(int(m.group(1)) == n for m in MARKER_LINE.finditer(vars_text or ""))


def error_text(cell, kinds=("error", "stderr")):
    """The error outputs of an executed cell, as plain text (empty when there are none):
    `error` messages (a compile error, a dead child process) and/or stderr."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "error" and "error" in kinds:
            tb = "\n".join(out.get("traceback", [])) or f"{out.get('ename')}: {out.get('evalue')}"
            parts.append(ANSI.sub("", tb) + "\n")
        elif out.output_type == "stream" and out.get("name") == "stderr" and "stderr" in kinds:
            parts.append(ANSI.sub("", out.text))  # evcxr sends a stream message per line
    return "".join(parts).strip()


def err_value(cell):
    """The text of a cell's result when it is an `Err(..)` (the cell's last expression was a
    `Result` that failed, shown by evcxr as its value instead of stopping the cell); else None."""
    for out in cell.get("outputs", []):
        if out.output_type == "execute_result":
            text = out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if text.lstrip().startswith("Err("):
                return text.strip()
    return None


def new_figure_errors(folder, seen):
    """What the export folder's FIGURE_ERRORS file gained past its first `seen` bytes, and its
    new length."""
    path = Path(folder) / FIGURE_ERRORS
    if not path.is_file():
        return "", seen
    data = path.read_bytes()
    return data[seen:].decode("utf-8", "replace").strip(), len(data)


def stdout_text(cells):
    """Everything the cells printed on stdout."""
    return "".join(out.text for cell in cells for out in cell.get("outputs", [])
                   if out.output_type == "stream" and out.get("name") == "stdout")


def verdict(cell, ran_to_end):
    """Why `cell` failed, or None when it passed.

    `ran_to_end` is what the probe saw (None for a cell of commands only, which is not probed).
    A cell fails on any error output, or when it stopped early even with no message. A cell
    tagged `raises-error` must instead stop early with an error on stderr (an `Err` returned
    with `?`, or a panic): running to its end, a compile error or a lost message fail it, and
    so does a message without the text in its metadata `genlab.expect_error`, if given."""
    error = error_text(cell)
    if RAISES not in cell.get("metadata", {}).get("tags", []):
        value = err_value(cell)
        if value and not error:
            return (f"the cell's value is an `Err` (it ran to its end and displayed the error as its "
                    f"result; add `?` to stop on it):\n{value}")
        if ran_to_end is False and not error:
            return ("the cell stopped before its end (an `Err` returned with `?`, or a panic) and its "
                    f"error message never arrived (waited {ERROR_WAIT:.0f} s; evcxr sends stderr "
                    "asynchronously)")
        return error or None
    kernel_error = error_text(cell, ("error",))
    stderr = error_text(cell, ("stderr",))
    expected = cell.get("metadata", {}).get("genlab", {}).get("expect_error")
    if kernel_error:
        return f"this cell is tagged `{RAISES}`, so it must run and return an error, but:\n{kernel_error}"
    if ran_to_end:
        return (f"this cell is tagged `{RAISES}` but ran to its end"
                + (f"; it wrote to stderr, which is not an error return:\n{stderr}" if stderr else " without an error"))
    if not stderr:
        return (f"this cell is tagged `{RAISES}` and stopped early, but its error message never "
                f"arrived (waited {ERROR_WAIT:.0f} s)")
    if expected and expected not in stderr:
        return f"this cell is tagged `{RAISES}`; its error should contain `{expected}` but reads:\n{stderr}"
    return None


class CellRunner:
    """Runs cells through nbclient and decides, independently of stderr, whether each one ran
    to its end (see `instrument`). Late output that arrives after a cell's idle status (evcxr
    sends stderr from another thread, so the idle status can overtake it) is read back into
    the cell while the probe runs, and for up to ERROR_WAIT seconds when a cell failed."""

    def __init__(self, client):
        self.client = client
        self.runs = 0
        self.last_msg_id = None
        self.last_parents = set()  # the requests whose output belongs to the last cell
        execute = client.kc.execute

        def recording_execute(*args, **kwargs):
            self.last_msg_id = execute(*args, **kwargs)
            return self.last_msg_id

        client.kc.execute = recording_execute

    def run(self, cell, index):
        """Executes `cell`; returns a dict with `ran_to_end` (None when not probed) and
        `error_at_idle` (whether its error output was there when nbclient returned)."""
        self.runs += 1
        n = self.runs
        code = instrument(cell.source, n)
        original = cell.source
        if code is not None:
            cell.source = code
        try:
            self.client.execute_cell(cell, index)
        finally:
            cell.source = original
        cell_msg = self.last_msg_id
        self.last_parents = {cell_msg}
        error_at_idle = bool(error_text(cell))
        ran_to_end, t0 = None, time.perf_counter()
        if code is not None:
            ran_to_end = run_sync(self._probe)(cell, index, cell_msg, n)
        return {"ran_to_end": ran_to_end, "error_at_idle": error_at_idle,
                "probe_seconds": round(time.perf_counter() - t0, 3)}

    async def _read(self, cell, index, parents, until, stop):
        """Reads iopub messages until `stop(msg)` or the deadline; late output of this cell
        (a parent in `parents`) goes into it. Returns the stopping message, or None."""
        kc = self.client.kc
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = await ensure_async(kc.iopub_channel.get_msg(timeout=left))
            except queue.Empty:
                return None
            if msg["parent_header"].get("msg_id") not in parents:
                continue
            if msg["msg_type"] in ("stream", "error", "display_data"):
                try:
                    self.client.process_message(msg, cell, index)
                except CellExecutionComplete:
                    pass
            if stop(msg):
                return msg

    async def _probe(self, cell, index, cell_msg, n):
        kc = self.client.kc
        probe_msg = kc.execute(":vars", store_history=False)
        parents = {cell_msg, probe_msg}
        self.last_parents = parents
        listing = []

        def probe_idle(msg):
            if msg["parent_header"].get("msg_id") != probe_msg:
                return False
            if msg["msg_type"] == "execute_result":
                listing.append(msg["content"].get("data", {}).get("text/plain", ""))
            return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"

        deadline = time.monotonic() + max(60, self.client.timeout or 0)
        if await self._read(cell, index, parents, deadline, probe_idle) is None:
            raise CellTimeoutError(f"the kernel did not answer `:vars` after cell {index}")
        try:
            await ensure_async(kc.shell_channel.get_msg(timeout=5))  # the probe's reply
        except queue.Empty:
            pass
        ran_to_end = completed("\n".join(listing), n)
        if not ran_to_end and not error_text(cell):
            # Stopped early: wait for its message, then a short quiet period for the rest.
            got = await self._read(cell, index, parents, time.monotonic() + ERROR_WAIT,
                                   lambda m: m["msg_type"] == "stream" and m["content"].get("name") == "stderr")
            if got is not None:
                await self._read(cell, index, parents, time.monotonic() + 0.3, lambda m: False)
        return ran_to_end

    def drain(self, cell, index, seconds):
        """Reads late output of the last cell for `seconds`."""
        run_sync(self._read)(cell, index, self.last_parents, time.monotonic() + seconds, lambda m: False)


def demo_notes(cell):
    """The notes of demonstrations that did not hold (lenient mode) in a cell's stdout."""
    notes = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            text = out.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            notes += [line for line in text.splitlines() if line.startswith(DEMO_NOTE)]
    return notes


def run_cells(runner, nb, out_dir, keep_going):
    """Runs every code cell of `nb` in the runner's kernel; returns (records, failures)."""
    records, failures = [], []
    last = None
    figure_errors_seen = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        expects_error = RAISES in cell.get("metadata", {}).get("tags", [])
        t0 = time.perf_counter()
        crashed = None
        try:
            probe = runner.run(cell, index)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            crashed = ANSI.sub("", str(e)) or type(e).__name__
            probe = {"ran_to_end": False, "error_at_idle": True, "probe_seconds": 0.0}
        seconds = time.perf_counter() - t0
        last = (cell, index)
        first = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
        text = error_text(cell)
        why = crashed or verdict(cell, probe["ran_to_end"])
        figure_errors, figure_errors_seen = new_figure_errors(out_dir, figure_errors_seen)
        if figure_errors and not why:
            why = f"a figure of this cell could not be drawn or exported:\n{figure_errors}"
        mark = "raised as expected" if expects_error and not why else ""
        notes = demo_notes(cell)
        records.append({"cell": index, "seconds": round(seconds, 3), "first_line": first,
                        "ran_to_end": probe["ran_to_end"], "error_at_idle": probe["error_at_idle"],
                        "probe_seconds": probe["probe_seconds"],
                        "expects_error": expects_error, "failed": bool(why), "notes": notes})
        print(f"   cell {index:>3}  {seconds:7.2f} s  {first}" + (f"  [{mark}]" if mark else ""),
              flush=True)
        for note in notes:
            print(f"            {note}", flush=True)
        if why:
            failures.append((index, cell.source, why if why == text else f"{why}\n{text}".strip()))
            if not keep_going or crashed:
                break
    if not failures and last is not None:
        runner.drain(*last, seconds=0.3)
    return records, failures


def fresh_dir(out_dir):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def finish(path, nb, out_dir, records, failures, wall, applied, mode, keep_going):
    """Checks the pass line, writes the executed copy and timings.json, reports; True if passed."""
    required = nb.metadata.get("genlab", {}).get("require_stdout")
    if not failures and required and required not in stdout_text(nb.cells):
        failures.append((None, "", f"the notebook never printed its pass line `{required}` "
                                   "(metadata genlab.require_stdout) on stdout"))
    for number, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), 1):
        if cell.get("execution_count") is not None:
            cell.execution_count = number  # the probes took every other number
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out.execution_count = number
    nbformat.write(nb, out_dir / path.name)
    (out_dir / "timings.json").write_text(json.dumps(
        {"notebook": path.name, "wall_seconds": round(wall, 2), "parameters": applied, "mode": mode,
         "cells": records},
        indent=1))
    figures = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".png", ".svg"))
    if failures:
        for index, source, text in failures[:1] if not keep_going else failures:
            where = f"in cell {index}" if index is not None else "at the end"
            print(f"FAILED {path.name} after {wall:.1f} s, {where}:", file=sys.stderr)
            if source:
                print("---- cell source ----\n" + source, file=sys.stderr)
            print("---- error ----\n" + text, file=sys.stderr)
        return False
    noted = sum(len(r["notes"]) for r in records)
    print(f"ok     {path.name}: {wall:.1f} s, {len(figures)} figure files in {out_dir}"
          + (f", {noted} demonstration(s) did not hold (noted above)" if noted else ""), flush=True)
    return True


def run_notebook(path, overrides, export_root, kernel, timeout, keep_going=False, strict=None,
                 edits=()):
    """Executes one notebook; returns (passed, wall seconds, per-cell records).

    Stops at the first failing cell, unless `keep_going` (the failure check uses it). `strict`:
    True or False sets GENLAB_STRICT for the kernel (a demonstration that does not hold is then
    an error, or a note); None leaves the environment's setting.

    `edits`: (overrides, export root) pairs run after it in the same kernel, as a learner edits
    the parameters and runs all cells again: each a fresh copy of the notebook with those
    overrides, in lenient mode, exported to `<its export root>/<notebook>/`. Each must pass too.
    The kernel finds its export folder and mode in the runner's file (GENLAB_RUNNER_FILE, read
    by `genlab::error::runner_setting` at every call), which is rewritten before each edit."""
    nb = nbformat.read(path, as_version=4)
    applied = inject(nb, overrides, path)
    out_dir = export_root / path.stem
    fresh_dir(out_dir)
    os.environ["GENLAB_EXPORT_DIR"] = str(out_dir.resolve())
    os.environ["GENLAB_AUTO_EXPORT"] = "1"
    if strict is not None:
        os.environ["GENLAB_STRICT"] = "1" if strict else "0"
    mode = "strict" if os.environ.get("GENLAB_STRICT", "") not in ("", "0") else "lenient"
    runner_file = (export_root / f".genlab-runner-{path.stem}").resolve()
    os.environ["GENLAB_RUNNER_FILE"] = str(runner_file)

    def settings(folder, strict_mode=None):
        # The first run leaves the mode to the environment (a notebook may switch it there, as
        # tests/notebooks/demonstrations.ipynb does); an edit's run sets it here.
        mode_line = "" if strict_mode is None else f"strict={int(strict_mode)}\n"
        runner_file.write_text(f"export_dir={folder.resolve()}\n" + mode_line)

    settings(out_dir)
    shown = ", ".join(f"{k}={v}" for k, v in applied.items())
    print(f"== {path} ({mode}" + (f"; parameters: {shown})" if shown else ")"), flush=True)

    client = NotebookClient(nb, kernel_name=kernel, timeout=timeout, startup_timeout=120,
                            allow_errors=True, resources={"metadata": {"path": str(path.parent.resolve())}})
    records, failures = [], []
    start = time.perf_counter()
    passed = True
    try:
        with client.setup_kernel():
            runner = CellRunner(client)
            records, failures = run_cells(runner, nb, out_dir, keep_going)
            wall = time.perf_counter() - start
            passed = finish(path, nb, out_dir, records, failures, wall, applied, mode, keep_going)
            for edit, edit_root in edits if passed else ():
                edit_nb = nbformat.read(path, as_version=4)
                edit_applied = inject(edit_nb, edit, path)
                edit_dir = edit_root / path.stem
                fresh_dir(edit_dir)
                shown = ", ".join(f"{k}={v}" for k, v in edit_applied.items())
                print(f"== {path} again in the same kernel (lenient; parameters: {shown})", flush=True)
                t0 = time.perf_counter()
                settings(edit_dir, False)
                client.nb = edit_nb
                edit_records, failures = run_cells(runner, edit_nb, edit_dir, keep_going)
                ok = finish(path, edit_nb, edit_dir, edit_records, failures, time.perf_counter() - t0,
                            edit_applied, "lenient", keep_going)
                passed = passed and ok
                if not ok:
                    break
    except (DeadKernelError, RuntimeError) as e:
        failures.append((None, "", f"the kernel failed: {e}"))
        wall = time.perf_counter() - start
        finish(path, nb, out_dir, records, failures, wall, applied, mode, keep_going)
        return False, wall, records
    return passed, time.perf_counter() - start, records


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--smoke", action="store_true", help="apply each notebook's smoke parameters first")
    p.add_argument("--export-root", type=Path, default=Path("exports"))
    p.add_argument("--kernel", default="genlab-rust")
    p.add_argument("--timeout", type=int, default=900,
                   help="seconds per cell (the slowest cell of a chapter at its defaults takes about a minute)")
    p.add_argument("--edit", action="append", default=[], metavar="'NOTEBOOK NAME=VALUE ...'",
                   help="after NOTEBOOK runs, run it again in the same kernel with these parameters "
                        "(on top of its smoke parameters with --smoke), lenient, as a learner's edit; "
                        "the n-th edit (from 0) exports to <edit-root>/<n>/")
    p.add_argument("--edit-root", type=Path, default=Path("target/robustness"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strict", dest="strict", action="store_true", default=None,
                      help="a demonstration that does not hold is an error (GENLAB_STRICT=1)")
    mode.add_argument("--lenient", dest="strict", action="store_false",
                      help="a demonstration that does not hold is a note (GENLAB_STRICT=0)")
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
            plans.append((path, overrides, []))
        for n, edit in enumerate(args.edit):
            name, *pairs = edit.split()
            plan = next((pl for pl in plans if pl[0].stem == name), None)
            if plan is None:
                raise ParamError(f"--edit `{edit}`: no notebook `{name}` among those run here")
            changes = dict(plan[1])
            for pair in pairs:
                if "=" not in pair:
                    raise ParamError(f"--edit `{edit}`: `{pair}` is not NAME=VALUE")
                key, value = pair.split("=", 1)
                changes[key.strip()] = value.strip()
            inject(nbformat.read(plan[0], as_version=4), changes, plan[0])
            plan[2].append((changes, args.edit_root / str(n)))
        unknown = sorted(set(cli) - known)
        if unknown:
            raise ParamError(f"unknown parameter `{unknown[0]}` (value `{cli[unknown[0]]}`): "
                             f"the notebooks run here take: {', '.join(sorted(known)) or 'none'}")
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # xtask reports exit status 2 as a bad parameter, before any cell ran

    passed = failed = 0
    for path, overrides, edits in plans:
        ok, _, _ = run_notebook(path, overrides, args.export_root, args.kernel, args.timeout,
                                strict=args.strict, edits=edits)
        passed, failed = passed + ok, failed + (not ok)
    print(f"notebooks: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
