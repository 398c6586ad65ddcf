"""A source checkout run without installing (``PYTHONPATH=.``, as on the GPU machine): the top-level
folders that the wheel installs inside this package (``patches/``, ``evals/``, ``demo/``) are found under
their installed names. Installed, they are ordinary subpackages and nothing is added."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

FOLDERS = ("patches", "evals", "demo")


class SourceFolders(importlib.abc.MetaPathFinder):
    def __init__(self, folders: dict):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install_source_folders(package: str, path) -> None:
    root = Path(__file__).resolve().parent.parent
    missing = {
        f"{package}.{name}": root / name
        for name in FOLDERS
        if not any((Path(p) / name).is_dir() for p in path) and (root / name / "__init__.py").is_file()
    }
    if missing and not any(isinstance(f, SourceFolders) for f in sys.meta_path):
        sys.meta_path.append(SourceFolders(missing))
