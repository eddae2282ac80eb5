"""What the benchmark scripts share: the machine a figure was measured on, a thermodiff command
run in-process for its JSON, and the record and image grids written to benchmarks/results/."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from thermodiff.cli import main
from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.run.machine import machine
from thermodiff.tasks.plotting import image_grid_png

RESULTS = Path(__file__).resolve().parent / "results"


def thermodiff_json(argv: list[str]) -> dict:
    """``thermodiff ARGV --json --quiet`` in this process, its one JSON object parsed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*argv, "--json", "--quiet"])
    if code != 0:
        raise SystemExit(code)
    return json.loads(stdout.getvalue())


def write_result(name: str, record: dict) -> Path:
    """benchmarks/results/NAME.json, the record plus the machine unless it names its own, written
    atomically (a kill mid-write leaves the previous record)."""
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({**record, "machine": record.get("machine", machine())}, indent=2) + "\n")
    return out


def cited(text: str, record: str, *paths: str, base: str = "../") -> str:
    """``text`` as a Markdown link to the JSON paths (in order, one per number in ``text``) of
    benchmarks/results/RECORD.json that hold its numbers: the form in which tests/test_docs.py
    checks every figure of the README (``base=""``) and of docs/ (the default)."""
    return f"[{text}]({base}benchmarks/results/{record}.json#{','.join(paths)})"


def write_grid(name: str, rows: list[np.ndarray], columns: int = 10) -> Path:
    """benchmarks/results/NAME.png: one row of images (original 8-bit units) per entry of ``rows``,
    the first ``columns`` of each, rounded and clipped to 0..255."""
    out = RESULTS / f"{name}.png"
    grid = np.concatenate([np.rint(r[:columns]).clip(0, 255) for r in rows]).astype(np.uint8)
    out.write_bytes(image_grid_png(grid, min(columns, len(rows[0]))))
    return out
