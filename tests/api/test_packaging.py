"""The wheel is the product: every subpackage of graphprune/ is packaged, passes/ as graphprune.passes."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_in_the_wheel():
    on_disk = {"graphprune." + ".".join(p.parent.relative_to(ROOT / "graphprune").parts)
               for p in (ROOT / "graphprune").rglob("__init__.py") if p.parent != ROOT / "graphprune"}
    on_disk |= {"graphprune", "graphprune.passes"}
    on_disk |= {"graphprune.passes." + ".".join(p.parent.relative_to(ROOT / "passes").parts)
                for p in (ROOT / "passes").rglob("__init__.py") if p.parent != ROOT / "passes"}
    listed = set(_config()["packages"])
    assert on_disk - listed == set(), f"subpackages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - on_disk)}"


def test_passes_mapped_from_top_level_folder():
    assert _config()["package-dir"]["graphprune.passes"] == "passes"
    assert (ROOT / "passes" / "__init__.py").is_file()
