"""Load the published ``elra`` 0.0.5 package under the name ``elra_published``.

It is fetched with pip into a cache folder (never vendored) and imported
beside this project's ``elra`` for comparisons. Its prints are its own, and
it writes ``state_lgs.txt`` into the working directory: run it inside
:func:`scratch_dir`, never in the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

VERSION = "0.0.5"
NAME = "elra_published"
CACHE = Path.home() / ".cache" / "elra-bench"
RESULTS = CACHE / "results"  # benchmarks write here unless --out says otherwise (never the checkout)


def load_published(cache: Path) -> ModuleType:
    """Install ``elra==0.0.5`` (no dependencies) into ``cache`` once and import it."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    root = cache / f"elra-{VERSION}"
    package = root / "elra"
    if not (package / "__init__.py").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(root), f"elra=={VERSION}"],
            check=True,
        )
    spec = importlib.util.spec_from_file_location(NAME, package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary working directory for the duration (the published package writes files into it)."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="elra-published-") as scratch:
        os.chdir(scratch)
        try:
            yield Path(scratch)
        finally:
            os.chdir(previous)
