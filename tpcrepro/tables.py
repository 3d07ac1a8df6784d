"""The paper's tables as data: tables/*.yaml -> TableSpec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tpcrepro import methods, paths
from tpcrepro.errors import UserError

COLUMN_KEYS = ("top1", "top5", "params_m", "gmacs", "images_per_sec", "image_size", "kappa", "params_free")
METHODS = (*methods.names(), "quoted")  # a row's method (tpcrepro/methods.py), or quoted from the paper
_TABLE_KEYS = {"id", "title", "backbone", "columns", "baseline", "rows", "from_paper", "smoke_seeds"}
_ROW_KEYS = {"id", "label", "paper", "method", "recipes", "note"}


@dataclass(frozen=True)
class Column:
    key: str
    header: str


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    paper: dict
    method: str
    recipes: dict = field(default_factory=dict)  # profile -> recipe id
    note: Optional[str] = None

    @property
    def quoted(self) -> bool:
        return self.method == "quoted"


@dataclass(frozen=True)
class TableSpec:
    id: str
    title: str
    backbone: str
    columns: tuple
    baseline: Optional[str]
    rows: tuple
    path: str = ""
    from_paper: bool = True  # false: a table of our own (its rows' paper values are all null)
    smoke_seeds: Optional[tuple] = None  # the seeds `run <table> --profile smoke` plans by default (else 0,1,2)

    def row(self, row_id: str) -> Row:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(row_id)


def _fail(path: Path, msg: str) -> None:
    raise UserError(f"{path}: {msg}")


def _row(path: Path, d: Any, keys: list[str]) -> Row:
    if not isinstance(d, dict):
        _fail(path, f"each row must be a mapping, got {d!r}")
    unknown = set(d) - _ROW_KEYS
    if unknown:
        _fail(path, f"row '{d.get('id')}' has unknown key '{sorted(unknown)[0]}'")
    if d.get("method") not in METHODS:
        _fail(path, f"row '{d.get('id')}' has method {d.get('method')!r}; use one of {', '.join(METHODS)}")
    if set(d.get("paper", {})) != set(keys):
        _fail(path, f"row '{d.get('id')}' must give the paper's value (or null) for exactly {keys}")
    if d["method"] == "quoted" and (d.get("recipes") or not d.get("note")):
        _fail(path, f"quoted row '{d['id']}' needs a note and no recipes")
    return Row(id=d["id"], label=str(d["label"]), paper=dict(d["paper"]), method=d["method"],
               recipes=dict(d.get("recipes") or {}), note=d.get("note"))


def load_table(table_id: str) -> TableSpec:
    path = paths.tables_dir() / f"{table_id}.yaml"
    if not path.exists():
        raise UserError(f"no table '{table_id}'; known tables: {', '.join(list_tables())}")
    d = yaml.safe_load(path.read_text())
    unknown = set(d) - _TABLE_KEYS
    if unknown:
        _fail(path, f"unknown key '{sorted(unknown)[0]}'")
    cols = tuple(Column(**c) for c in d["columns"])
    bad = [c.key for c in cols if c.key not in COLUMN_KEYS]
    if bad:
        _fail(path, f"unknown column key '{bad[0]}' (valid: {', '.join(COLUMN_KEYS)})")
    rows = tuple(_row(path, r, [c.key for c in cols]) for r in d["rows"])
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        _fail(path, "row ids must be unique")
    if d.get("baseline") is not None and d["baseline"] not in ids:
        _fail(path, f"baseline '{d['baseline']}' is not a row id")
    seeds = d.get("smoke_seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds)):
        _fail(path, f"smoke_seeds must be a list of integers, got {seeds!r}")
    return TableSpec(id=d["id"], title=d["title"], backbone=d["backbone"], columns=cols,
                     baseline=d.get("baseline"), rows=rows, path=str(path), from_paper=bool(d.get("from_paper", True)),
                     smoke_seeds=tuple(seeds) if seeds else None)


def list_tables() -> list[str]:
    names = [p.stem for p in paths.tables_dir().glob("*.yaml")]
    return sorted(names, key=lambda n: (not n.startswith("table"), int(n[5:]) if n[5:].isdigit() else 0, n))


def load_all() -> list[TableSpec]:
    return [load_table(t) for t in list_tables()]
