"""Command-line checks the benchmarks share: counts, fractions and the output folder, refused in one line
before any run (a typo used to end a 60-minute run in an empty table, a traceback, or an unwritable folder)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def known(parser: argparse.ArgumentParser, what: str, given: list[str] | None, names: list[str]) -> None:
    """Refuse names not among ``names`` (the quoting of a name with spaces is the usual slip)."""
    unknown = [name for name in given or () if name not in names]
    if unknown:
        parser.error(f"unknown {what} {unknown}; known: {names} (quote names with spaces)")


def writable_folder(parser: argparse.ArgumentParser, folder: Path) -> Path:
    """``folder`` created and tried with a file before the runs; the resolved path."""
    folder = folder.resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        parser.error(f"--out {folder}: cannot write there ({error.strerror or error})")
    return folder
