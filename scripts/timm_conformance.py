"""Run timm's own model tests (tests/test_models.py of the installed timm version) on tpcrepro's models.

    python scripts/timm_conformance.py [--models GLOB ...] [--tests NAME ...] [--src DIR] [-- PYTEST ARGS]

Fetches the installed timm version's source distribution with pip (or uses
--src, an unpacked sdist or a cache directory), extends timm's own filter lists
with the project's models the way timm lists its own families (ViT-like models
in NON_STD_FILTERS; families that cannot be scripted or traced in
EXCLUDE_JIT_FILTERS / EXCLUDE_FX_FILTERS, each with its reason), runs the test
file on the project's models only, and prints passed/failed per test and model
family. Exit status 0 when nothing failed (a test that only could not download
released weights from the hub is counted apart, as needing a network).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# model-name prefix -> family (first match wins)
FAMILIES = [
    ("tpc_lvvit_", "TPC-LV-ViT"), ("evit_lvvit_", "EViT-LV-ViT"), ("tpc_swin_", "TPC-Swin"), ("tpc_", "TPC-ViT"),
    ("avit_", "A-ViT"), ("evit_", "EViT"), ("dynamicvit_", "DynamicViT"), ("tome_", "ToMe"), ("lvvit_", "LV-ViT"),
    ("swin_", "Swin"), ("vit_", "ViT"),
]
# transformer models whose forward_features is a token sequence, as timm lists its ViT/DeiT families
NON_STD = ["tpc_deit_*", "tpc_vit_*", "avit_*", "evit_*", "dynamicvit_*", "tome_*", "lvvit_*", "tpc_lvvit_*"]
# (tests, models, reason): what cannot apply by design, as timm's EXCLUDE_JIT_FILTERS / EXCLUDE_FX_FILTERS
# exclude its own such families; the conftest deselects these and the table marks them "excl"
HALTING = ("data-dependent halting: which tokens run, and which images stay in the batch, depend on the "
           "values (Python control flow on tensors), which TorchScript and FX cannot capture")
EXCLUDED = [
    ("*torchscript*", "tpc_*", HALTING), ("*_fx*", "tpc_*", HALTING),
    ("*torchscript*", "avit_*", HALTING), ("*_fx*", "avit_*", HALTING),
    ("*torchscript*", "dynamicvit_*", "per-image token selection with a Gumbel-softmax training form and a "
     "distillation teacher held outside the module tree; not written for TorchScript"),
    ("test_model_backward*", "dynamicvit_*", "the method freezes cls_token and pos_embed (DynamicViT trains "
     "neither); the test demands a gradient on every parameter"),
]


def family(name: str) -> str:
    return next(f for p, f in FAMILIES if name.startswith(p))


NO_SDIST = 3  # exit status when the source distribution cannot be fetched (no index reachable)


def fetch_sdist(version: str, into: Path) -> Path:
    """The unpacked source distribution of timm==version (pip download, no wheels)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                           f"timm=={version}", "-d", str(into)], capture_output=True, text=True)
    archive = next(into.glob(f"timm-{version}.tar.gz"), None)
    if proc.returncode or archive is None:
        print(f"error: could not fetch timm=={version}'s source distribution with pip "
              f"({proc.stderr.strip().splitlines()[-1:] or 'no archive'}); pass --src DIR holding "
              f"timm-{version}.tar.gz", file=sys.stderr)
        sys.exit(NO_SDIST)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / f"timm-{version}"


def excluded_reason(test: str, model: str) -> str | None:
    return next((why for t, m, why in EXCLUDED if fnmatch.fnmatch(test, t) and fnmatch.fnmatch(model, m)), None)


def _extend(src: str, name: str, patterns: list[str]) -> str:
    """Append patterns to timm's module-level list `name = [...]` (fails loudly if the list is gone)."""
    m = re.search(rf"^{name} = \[.*?^\]\n", src, flags=re.S | re.M)
    if m is None:
        raise SystemExit(f"error: {name} not found in timm's tests/test_models.py; update scripts/timm_conformance.py")
    return src[: m.end()] + f"{name} += {patterns!r}  # tpcrepro\n" + src[m.end():]


CONFTEST = '''
"""Only tpcrepro's models: list_models returns them alone; tests named on other models are deselected."""
import fnmatch
import json
import os

import timm
import tpcrepro.models  # noqa: E402,F401  (registers the project's models)

OURS = set(filter(None, os.environ["TPCREPRO_CONFORMANCE_MODELS"].split(",")))
TESTS = set(filter(None, os.environ.get("TPCREPRO_CONFORMANCE_TESTS", "").split(",")))
EXCLUDED = json.loads(os.environ.get("TPCREPRO_CONFORMANCE_EXCLUDED", "[]"))


def _excluded(test, model):
    return any(fnmatch.fnmatch(test, t) and fnmatch.fnmatch(model, m) for t, m, _ in EXCLUDED)
_list_models = timm.list_models


def _ours_only(*args, **kwargs):
    return [m for m in _list_models(*args, **kwargs) if m.split(".")[0] in OURS]


timm.list_models = _ours_only


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("model_name")
        name = name.split(".")[0] if isinstance(name, str) else None  # the cfg tests list names with tags
        wanted = name in OURS and (not TESTS or item.originalname in TESTS) and not _excluded(item.originalname, name)
        (keep if wanted else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
'''


def prepare(sdist: Path) -> Path:
    tests = sdist / "tests"
    shutil.rmtree(sdist / "timm", ignore_errors=True)  # test the installed timm, not the sdist's copy
    src = (tests / "test_models.py").read_text()
    src = _extend(src, "NON_STD_FILTERS", NON_STD)
    (tests / "test_models.py").write_text(src)
    (tests / "conftest.py").write_text((tests / "conftest.py").read_text() + CONFTEST)
    return tests


def results(xml: Path) -> dict:
    """{(test, family): {"passed": [...], "failed": [...], "skipped": [...], "offline": [...]}} from pytest's junit XML."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for case in ET.parse(xml).getroot().iter("testcase"):
        m = re.match(r"(\w+)\[(.*)\]", case.get("name", ""))
        if not m:
            continue
        test, params = m.groups()
        model = next((p for p in params.split("-") if any(p.startswith(q) for q, _ in FAMILIES)), params)
        kids = {c.tag for c in case}
        status = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
        if status == "failed" and offline(case):
            status = "offline"
        out[(test, family(model))][status].append(model)
    return out


# what a download of released weights raises on a machine that cannot reach the hub
OFFLINE = re.compile(r"LocalEntryNotFoundError|OfflineModeIsEnabled|ConnectionError|NameResolutionError|"
                     r"Max retries exceeded|Temporary failure in name resolution|Network is unreachable")


def offline(case) -> bool:
    """A failed test case whose failure is only that the hub (released weights) cannot be reached."""
    text = " ".join((c.get("message") or "") + " " + (c.text or "") for c in case if c.tag in ("failure", "error"))
    return bool(OFFLINE.search(text))


def per_model_tests(src: str) -> list[str]:
    """The test functions of test_models.py parametrized over list_models(...), in file order."""
    out = []
    for m in re.finditer(r"parametrize\(\s*'model_name',\s*list_models\(", src):
        d = re.compile(r"^\s*def (test_\w+)\(", re.M).search(src, m.end())
        if d and d.group(1) not in out:
            out.append(d.group(1))
    return out


def is_excluded(test: str, fam: str, models: list[str]) -> bool:
    return any(family(m) == fam and excluded_reason(test, m) for m in models)


def excluded(models: list[str], tests: list[str]) -> list[tuple[str, str, str]]:
    """(tests, families, reason) for the exclusions that apply to these models and tests."""
    out: dict = {}
    for t, m, why in EXCLUDED:
        fams = sorted({family(x) for x in models if fnmatch.fnmatch(x, m)})
        hit = [x for x in tests if fnmatch.fnmatch(x, t)]
        if fams and hit:
            out.setdefault((why, ", ".join(fams)), set()).update(hit)
    return [(", ".join(sorted(ts)), fams, why) for (why, fams), ts in out.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="model-name globs (default: every tpcrepro model)")
    ap.add_argument("--tests", nargs="*", default=None, help="test functions of test_models.py (default: all)")
    ap.add_argument("--src", type=Path, default=None, help="directory holding timm-<version>.tar.gz (else a temp dir)")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()

    import timm

    sys.path.insert(0, str(REPO))
    import tpcrepro.models  # noqa: F401

    version = timm.__version__
    ours = sorted(_registered_here())
    if args.models:
        ours = [m for m in ours if any(fnmatch.fnmatch(m, g) for g in args.models)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.src and (args.src / f"timm-{version}.tar.gz").exists():
            shutil.copy(args.src / f"timm-{version}.tar.gz", work)
            with tarfile.open(work / f"timm-{version}.tar.gz") as tar:
                tar.extractall(work, filter="data")
            sdist = work / f"timm-{version}"
        else:
            sdist = fetch_sdist(version, work)
        rows = per_model_tests((sdist / "tests" / "test_models.py").read_text())
        tests = prepare(sdist)
        xml = work / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               str(tests / "test_models.py"), *args.pytest_args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "TPCREPRO_CONFORMANCE_MODELS": ",".join(ours), "TPCREPRO_CONFORMANCE_TESTS": ",".join(args.tests or []),
               "TPCREPRO_CONFORMANCE_EXCLUDED": json.dumps(EXCLUDED)}
        print(f"timm {version}: tests/test_models.py on {len(ours)} tpcrepro models", flush=True)
        proc = subprocess.run(cmd, cwd=sdist, env=env, capture_output=True, text=True)
        if not xml.exists():
            print(proc.stdout[-4000:], proc.stderr[-4000:])
            return 2
        table = results(xml)
        fails = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    print_table(table, ours, rows)
    for ln in fails:
        print(ln[:300])
    return 1 if any(v["failed"] for v in table.values()) else 0


def _registered_here() -> set[str]:
    """The models tpcrepro registers (their entry points live in tpcrepro's modules)."""
    from timm.models._registry import _model_entrypoints

    return {n for n, fn in _model_entrypoints.items() if fn.__module__.startswith("tpcrepro.")}


def print_table(table: dict, models: list[str], rows: list[str]) -> None:
    fams = [f for _, f in FAMILIES if any(family(m) == f for m in models)]
    tests = rows + sorted({t for t, _ in table} - set(rows))
    width = max(len(t) for t in tests) if tests else 10
    print(f"\n{'test':<{width}}  " + "  ".join(f"{f:>11}" for f in fams))
    for t in tests:
        cells = []
        for f in fams:
            r = table.get((t, f))
            if not r:
                cells.append(f"{'excl' if is_excluded(t, f, models) else '-':>11}")
                continue
            p, x, s, o = len(r["passed"]), len(r["failed"]), len(r["skipped"]), len(r["offline"])
            cells.append(f"{f'{p}/{p + x}' + (f' s{s}' if s else '') + (f' o{o}' if o else ''):>11}")
        print(f"{t:<{width}}  " + "  ".join(cells))
    total_p = sum(len(r["passed"]) for r in table.values())
    total_f = sum(len(r["failed"]) for r in table.values())
    total_s = sum(len(r["skipped"]) for r in table.values())
    total_o = sum(len(r["offline"]) for r in table.values())
    print("\ncells: passed/run (sN: N of them skipped by the test itself; oN: N more that download released "
          "weights and could not reach the hub, not counted as run); excl: excluded by design (below); "
          "'-': timm's own filters do not collect the family for that test")
    print(f"total: {total_p} passed, {total_f} failed, {total_s} skipped, {total_o} need a network (hub weights)")
    rows = excluded(models, tests)
    if rows:
        print("\nexcluded by design (deselected, as timm's own exclusion lists leave out such families):")
        for tests_, fams_, why in rows:
            print(f"  {fams_} / {tests_}:\n      {why}")


if __name__ == "__main__":
    sys.exit(main())
