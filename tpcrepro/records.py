"""Run records: one flat JSON file per measurement, written atomically.

Records are append-only: a rerun writes a new file and the newest valid one
for a (recipe, profile, kind, seed) key wins. A process reads each file once
(`load_records` keeps what it parsed, keyed by the file's inode, size and
mtime), and `newest()` is the one query the report, the figures, the claims,
`list` and `run` ask: the newest record per key, with `current()` (a recipe's
records of its current hash, else its older ones flagged stale).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

from tpcrepro import __version__, cpu, paths

SCHEMA_VERSION = 1
STATUSES = ("done", "failed")


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write through `write(file)` into a temp file in the same directory, fsync, rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _commit_now() -> str | None:
    """HEAD's short hash, with '+dirty' when tracked tpcrepro sources differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "tpcrepro")
    return head + ("+dirty" if dirty else "")


_COMMIT_AT_START = _commit_now()  # the code this process runs was loaded now, not when a record is written


def git_commit() -> str | None:
    return _COMMIT_AT_START


def device_name(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: str = "cpu") -> dict:
    import timm
    import torch

    return {
        "git_commit": git_commit(),
        "tpcrepro": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": device_name(device),
        "hostname": platform.node(),
        **cpu.describe(),  # CPU kernels, pins, ISA flags, threads: what bit-exact reruns need to match
    }


@dataclass(frozen=True)
class Record:
    recipe: str
    recipe_hash: str
    profile: str
    kind: str
    seed: int
    status: str
    metrics: dict
    settings: dict
    overrides: list
    environment: dict
    started_at: str
    duration_s: float
    error: str | None = None
    schema: int = SCHEMA_VERSION
    path: str | None = None  # where it was read from; not stored

    def key(self) -> tuple:
        return (self.recipe, self.profile, self.kind, self.seed, self.recipe_hash)

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "path"}
        return json.dumps(d, indent=1, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def new(recipe: str, recipe_hash: str, profile: str, kind: str, *, metrics: dict, settings: dict, device: str,
        started_at: Optional[str] = None, duration_s: float = 0.0, seed: int = 0, status: str = "done",
        overrides: Iterable[str] = (), error: Optional[str] = None) -> Record:
    """A record of a measurement this process made on `device`, its environment (commit, versions, CPU) filled in."""
    return Record(recipe=recipe, recipe_hash=recipe_hash, profile=profile, kind=kind, seed=seed, status=status,
                  metrics=metrics, settings=settings, overrides=list(overrides), environment=environment(device),
                  started_at=started_at or now_iso(), duration_s=duration_s, error=error)


def write_record(record: Record, directory: Path | None = None) -> Path:
    directory = directory or paths.records_dir()
    stamp = record.started_at.replace(":", "").replace("-", "")
    name = f"{record.recipe.replace('/', '__')}__{record.kind}__s{record.seed}__{stamp}.json"
    path = directory / name
    n = 1
    while path.exists():
        path = directory / name.replace(".json", f"_{n}.json")
        n += 1
    atomic_write_text(path, record.to_json() + "\n")
    return path


_REQUIRED = tuple(n for n, f in Record.__dataclass_fields__.items()
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_TYPES = {"recipe": str, "recipe_hash": str, "profile": str, "kind": str, "seed": int, "status": str,
          "metrics": dict, "settings": dict, "overrides": list, "environment": dict, "started_at": str}
_warned: set = set()


def read_record(p: Path) -> Record:
    """One record file; ValueError saying what is wrong with it otherwise."""
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"holds a JSON {type(d).__name__}, not a record object")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"incomplete: missing {', '.join(missing)}")
    wrong = [k for k, t in _TYPES.items() if not isinstance(d[k], t) or isinstance(d[k], bool)]
    if wrong:
        raise ValueError(f"'{wrong[0]}' should be a {_TYPES[wrong[0]].__name__}, got {d[wrong[0]]!r:.40}")
    if d["status"] not in STATUSES:
        raise ValueError(f"unknown status {d['status']!r} (valid: {', '.join(STATUSES)})")
    d = {k: v for k, v in d.items() if k in Record.__dataclass_fields__}
    return Record(**{**d, "path": str(p)})


_parsed: dict[str, tuple[tuple, Record | str]] = {}  # path -> ((inode, size, mtime), the record or what is wrong)


def load_records(directory: Path | None = None) -> list[Record]:
    """Every record in the folder; a damaged or incomplete file gets one warning line on stderr (once) and is left out.

    Each file is read once per process: a file whose inode, size and mtime are unchanged is not read again.
    """
    directory = directory or paths.records_dir()
    out = []
    for p in sorted(directory.glob("*.json")):
        try:
            st = p.stat()
        except OSError:  # removed since the listing
            continue
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = _parsed.get(str(p))
        if hit is None or hit[0] != sig:
            try:
                hit = (sig, read_record(p))
            except ValueError as e:
                hit = (sig, str(e))
            _parsed[str(p)] = hit
        if isinstance(hit[1], Record):
            out.append(hit[1])
        elif (str(p), st.st_mtime_ns) not in _warned:
            _warned.add((str(p), st.st_mtime_ns))
            print(f"warning: skipping record {p}: {hit[1]}", file=sys.stderr)
    return out


class Latest(dict):
    """The newest record per (recipe, profile, kind, seed, recipe hash), with the queries by recipe (not to be changed
    after a query: the index by recipe is built once)."""

    def of(self, recipe_id: str, profile: str) -> list[Record]:
        """A recipe's records at a profile, every kind, seed and hash, in the order of their keys as text."""
        if not hasattr(self, "_by_recipe"):
            groups: dict[tuple, list] = {}
            for k, r in sorted(self.items(), key=lambda kv: str(kv[0])):
                groups.setdefault(k[:2], []).append(r)
            self._by_recipe = groups
        return self._by_recipe.get((recipe_id, profile), [])

    def current(self, recipe: Any, profile: Optional[str] = None, kinds: Optional[tuple] = None,
                same_data: bool = True) -> tuple[list[Record], bool]:
        """(records, stale): a recipe's newest records of its current hash (of `kinds`, default every kind).

        A recipe with none of its current version: the newest per (kind, seed) among older versions, stale=True;
        with same_data, only those measured on the recipe's data set now (never another data set's numbers).
        """
        profile = profile or recipe.profile
        mine = [r for r in self.of(recipe.id, profile) if kinds is None or r.kind in kinds]
        now = [r for r in mine if r.recipe_hash == recipe.hash]
        if now:
            return now, False
        newest: dict = {}
        for r in mine:
            if same_data and r.settings.get("data") != recipe.data.dataset:
                continue
            k = (r.kind, r.seed)
            if k not in newest or r.started_at > newest[k].started_at:
                newest[k] = r
        return [newest[k] for k in sorted(newest)], bool(newest)

    def current_record(self, recipe: Any, kind: str, seed: int) -> tuple[Optional[Record], bool]:
        """(record, stale) of one job: its newest record of the current hash, else of another hash (stale), else None."""
        key = (recipe.id, recipe.profile, kind, seed, recipe.hash)
        if key in self:
            return self[key], False
        older = [r for r in self.of(recipe.id, recipe.profile) if r.kind == kind and r.seed == seed]
        return (max(older, key=lambda r: (r.started_at, r.path or "")), True) if older else (None, False)


def latest(records: Iterable[Record], only_done: bool = True) -> Latest:
    """Newest record per (recipe, profile, kind, seed, recipe hash); by default only successful ones."""
    best = Latest()
    for r in records:
        if only_done and r.status != "done":
            continue
        k = r.key()
        if k not in best or (r.started_at, r.path or "") > (best[k].started_at, best[k].path or ""):
            best[k] = r
    return best


_newest: dict[tuple, Latest] = {}


def newest(directory: Path | None = None, only_done: bool = True) -> Latest:
    """latest(load_records(directory)), computed once while the folder's files stay the same."""
    recs = load_records(directory)
    sig = (only_done, tuple((r.path, _parsed[r.path][0]) for r in recs))
    if sig not in _newest:
        if len(_newest) > 8:  # another folder or changed files: the old ones are not asked again
            _newest.clear()
        _newest[sig] = latest(recs, only_done)
    return _newest[sig]
