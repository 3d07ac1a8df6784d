"""The committed tables and README blocks are what `tpcrepro report` renders from the committed records."""

from __future__ import annotations

import shutil

import pytest

from tpcrepro import paths, report

COMMITTED = paths.ROOT / "results"


@pytest.fixture
def committed_records(tmp_path, monkeypatch):
    if not (COMMITTED / "records").is_dir() or not (COMMITTED / "tables").is_dir():
        pytest.skip("no committed results")
    shutil.copytree(COMMITTED / "records", tmp_path / "results" / "records")
    monkeypatch.setenv("TPCREPRO_RESULTS", str(tmp_path / "results"))
    return tmp_path


def test_report_renders_the_committed_tables_byte_for_byte(committed_records):
    written = report.write_all()
    assert written
    for path in written:
        assert path.read_bytes() == (COMMITTED / "tables" / path.name).read_bytes(), path.name


def test_readme_blocks_refill_to_what_is_committed(committed_records):
    readme = committed_records / "README.md"
    shutil.copy(paths.ROOT / "README.md", readme)
    assert report.update_readme(readme) > 0
    assert readme.read_text() == (paths.ROOT / "README.md").read_text()
