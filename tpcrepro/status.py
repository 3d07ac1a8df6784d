"""`tpcrepro list`: each table row's status per profile."""

from __future__ import annotations

from typing import Callable

from tpcrepro import records, runner, tables
from tpcrepro.recipe import load_recipe

ORDER = ("failed", "stale", "missing", "done")  # a row takes the worst status of its jobs


def row_status(row: tables.Row, profile: str, seeds: list[int], any_: dict, done: dict) -> str:
    if row.quoted:
        return "quoted"
    if profile not in row.recipes:
        return "no recipe"
    jobs = runner.plan([load_recipe(row.recipes[profile])], seeds)
    found = {runner.job_status(j, any_, done) for j in jobs if not j.dependency}  # the row's own jobs, not its base's
    return next(s for s in ORDER if s in found)


def table_status(profiles: list[str], seeds_for: Callable[[str], list[int]]) -> list[dict]:
    any_, done = records.newest(only_done=False), records.newest()
    out = []
    for spec in tables.load_all():
        for row in spec.rows:
            entry = {"table": spec.id, "row": row.id, "label": row.label}
            for p in profiles:
                entry[p] = row_status(row, p, seeds_for(p), any_, done)
            out.append(entry)
    return out


def print_status(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    profiles = [k for k in rows[0] if k not in ("table", "row", "label")] if rows else []
    colour = {"done": "green", "failed": "red", "stale": "yellow", "missing": "white", "quoted": "dim", "no recipe": "dim"}
    t = Table("table", "row", "label", *profiles)
    for r in rows:
        t.add_row(r["table"], r["row"], r["label"], *[f"[{colour[r[p]]}]{r[p]}[/]" for p in profiles])
    Console().print(t)  # stdout: this is the command's output
