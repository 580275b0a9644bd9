"""Load the published ``elra`` 0.0.5 package under the name ``elra_published``.

It is fetched with pip into a cache folder (never vendored) and imported
beside this project's ``elra`` for comparisons. Its prints are its own.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

VERSION = "0.0.5"
NAME = "elra_published"


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
