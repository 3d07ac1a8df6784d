"""Where the project keeps tables, recipes, records and runs."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("TPCREPRO_ROOT", PACKAGE_DIR.parent))


def tables_dir() -> Path:
    return Path(os.environ.get("TPCREPRO_TABLES", ROOT / "tables"))


def recipes_dir() -> Path:
    return Path(os.environ.get("TPCREPRO_RECIPES", ROOT / "recipes"))


def results_dir() -> Path:
    return Path(os.environ.get("TPCREPRO_RESULTS", ROOT / "results"))


def records_dir() -> Path:
    return results_dir() / "records"


def runs_dir() -> Path:
    return Path(os.environ.get("TPCREPRO_RUNS", ROOT / "runs"))
