"""Plan the jobs a table (or recipe) needs, skip the done ones, launch the rest.

Training jobs on several processes go through torchrun (one machine with
--nproc-per-node, several with torchrun's rendezvous options); everything
else runs in this process. On a Slurm cluster, `submit` sends one job per
recipe (row) through submitit instead, as DeiT's own scripts do.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import submitit.helpers

from tpcrepro import records, tables
from tpcrepro.errors import Interrupted, UserError
from tpcrepro.progress import log
from tpcrepro.recipe import Recipe, load_recipe, recipe_path

SEED_FREE_KINDS = ("flops", "throughput")  # measured once, not per seed


@dataclass(frozen=True)
class Job:
    recipe: Recipe
    kind: str
    seed: int
    dependency: bool = False  # planned only because a target recipe starts from it (--force does not rerun it)

    @property
    def label(self) -> str:
        return f"{self.recipe.id} {self.kind}" + ("" if self.kind in SEED_FREE_KINDS else f" seed {self.seed}")


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: Optional[int] = None
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    data: Optional[str] = None
    device: Optional[str] = None
    extra: tuple = field(default_factory=tuple)


def target_recipes(target: str, profile: str, overrides: tuple = ()) -> list[Recipe]:
    """The recipes a table needs for a profile, or the one recipe named; 'all' = every table."""
    if target == "all":
        ids = []
        for t in tables.list_tables():
            ids += [i for i in _table_recipe_ids(t, profile) if i not in ids]
    elif target in tables.list_tables():
        ids = _table_recipe_ids(target, profile)
    elif recipe_path(target).exists():
        ids = [target]
    else:
        raise UserError(f"'{target}' is neither a table ({', '.join(tables.list_tables())}) nor a recipe id "
                        "(`tpcrepro recipes` lists them)")
    out = [load_recipe(i, overrides) for i in ids]
    wrong = [r.id for r in out if r.profile != profile]
    if wrong:
        raise UserError(f"recipe {wrong[0]} is of profile '{load_recipe(wrong[0]).profile}', not '{profile}'; "
                        f"pass --profile {load_recipe(wrong[0]).profile}")
    return out


def _table_recipe_ids(table_id: str, profile: str) -> list[str]:
    ids: list[str] = []
    for row in tables.load_table(table_id).rows:
        rid = row.recipes.get(profile)
        if rid and rid not in ids:
            ids.append(rid)
    return ids


def plan(recipes: list[Recipe], seeds: list[int], kinds: Optional[tuple] = None) -> list[Job]:
    """Jobs in order: a recipe fine-tuned from another (model.init_from) comes after that one's training.

    kinds: only these job kinds (e.g. ("flops",): params and MACs need neither data nor weights).
    """
    jobs: list[Job] = []
    for r in recipes:
        wanted = [k for k in r.jobs if kinds is None or k in kinds]
        if r.model.init_from and "train" in wanted:
            dep = load_recipe(r.model.init_from)
            jobs += [Job(dep, "train", s, dependency=True) for s in seeds]
        jobs += [Job(r, kind, s) for kind in wanted for s in ([0] if kind in SEED_FREE_KINDS else seeds)]
    seen, out = set(), []
    for j in jobs:
        key = (j.recipe.id, j.recipe.hash, j.kind, j.seed)
        if key not in seen:
            seen.add(key)
            out.append(j)
    return out


def job_status(job: Job, latest_any: records.Latest, latest_done: records.Latest) -> str:
    """done | failed | stale (done only for another recipe version) | missing."""
    rec, stale = latest_done.current_record(job.recipe, job.kind, job.seed)
    if rec is not None and not stale:
        return "done"
    last = latest_any.get((job.recipe.id, job.recipe.profile, job.kind, job.seed, job.recipe.hash))
    if last is not None and last.status == "failed":
        return "failed"
    return "stale" if rec is not None else "missing"


def statuses(jobs: list[Job]) -> list[tuple[Job, str]]:
    any_, done = records.newest(only_done=False), records.newest()
    return [(j, job_status(j, any_, done)) for j in jobs]


def job_command(job: Job, launch: Launch, force: bool = False) -> list[str]:
    """The command line that runs one job: `tpcrepro job ...`, under torchrun when it spans processes."""
    args = ["job", job.recipe.id, "--kind", job.kind, "--seed", str(job.seed)] + (["--force"] if force else [])
    for o in job.recipe.overrides:
        args += ["--set", o]
    if launch.data:
        args += ["--data", launch.data]
    if launch.device:
        args += ["--device", launch.device]
    if job.kind != "train" or (launch.nproc_per_node == 1 and launch.nnodes == 1):
        return ["tpcrepro", *args]
    run = ["torchrun", f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes > 1:
        run += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
        run += [f"--rdzv-id={launch.rdzv_id or job.recipe.id.replace('/', '_')}"]
        if launch.node_rank is not None:
            run += [f"--node-rank={launch.node_rank}"]
    return [*run, *launch.extra, "-m", "tpcrepro", *args]


def execute(job: Job, launch: Launch, force: bool = False) -> None:
    cmd = job_command(job, launch, force)
    if cmd[0] == "tpcrepro":
        from tpcrepro.jobs import run_job

        run_job(job.recipe, job.kind, job.seed, data_root=launch.data, device=launch.device, force=force)
        return
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise UserError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    log(f"launching: {shlex.join(cmd)}")
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except Interrupted as e:  # pass the signal on (torchrun forwards it to its workers) and let them stop cleanly
        proc.send_signal(e.signum)
        proc.wait()
        raise
    if rc != 0:
        raise UserError(f"{job.label} failed under torchrun (exit {rc}); its record and the log above say why")


def pending(jobs: list[Job], force: bool = False) -> list[tuple[Job, str, bool]]:
    """The jobs to run with their status and whether forced (done jobs are skipped unless forced)."""
    out = []
    for job, status in statuses(jobs):
        forced = force and not job.dependency
        if status != "done" or forced:
            out.append((job, status, forced))
    return out


def gpu_hours(jobs: list[Job]) -> tuple[float, list[str]]:
    """The stated cost (recipe key cost_gpu_hours: its training or evaluation) of the train jobs among `jobs`.

    Counted once per seed trained; flops and throughput jobs are minutes and not counted.
    Returns (total, recipes that state none).
    """
    total, unknown, seen = 0.0, [], set()
    for j in jobs:
        key = (j.recipe.id, j.seed)
        if j.kind != "train" or key in seen:
            continue
        seen.add(key)
        if j.recipe.cost_gpu_hours is None:
            if j.recipe.id not in unknown:
                unknown.append(j.recipe.id)
        else:
            total += j.recipe.cost_gpu_hours
    return total, unknown


def measured_seconds(jobs: list[Job]) -> tuple[float, list[str]]:
    """What `jobs` took when last run here: each job's newest done record of its recipe and kind (any seed).

    Returns (seconds, recipes never run). On the machine that made the records this is the cost of a fresh run.
    With --results elsewhere, the repository's committed records count too.
    """
    from tpcrepro import paths

    committed = paths.ROOT / "results" / "records"
    found = records.load_records()
    if committed.resolve() != paths.records_dir().resolve() and committed.is_dir():
        found += records.load_records(committed)
    newest: dict = {}
    for r in found:
        if r.status == "done" and r.duration_s is not None:
            key = (r.recipe, r.profile, r.kind)
            if key not in newest or r.started_at > newest[key].started_at:
                newest[key] = r
    total, unknown = 0.0, []
    for j in jobs:
        rec = newest.get((j.recipe.id, j.recipe.profile, j.kind))
        if rec is None:
            if j.recipe.id not in unknown:
                unknown.append(j.recipe.id)
        else:
            total += rec.duration_s
    return total, unknown


def check_data(jobs: list[Job], data: Optional[str]) -> None:
    """Every training job's data directory exists (before any job starts, weights are fetched or time is spent)."""
    from tpcrepro import data as data_mod

    for j in jobs:
        if j.kind == "train" and j.recipe.data.dataset != "digits":
            data_mod.resolve_root(j.recipe.data, data)


def run(jobs: list[Job], launch: Launch, force: bool = False, dry_run: bool = False,
        keep_going: bool = False) -> dict[str, int]:
    """Run the jobs that are not done (all with force); return counts by outcome."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    todo = {id(j): (status, forced) for j, status, forced in pending(jobs, force)}
    if not dry_run:
        check_data([j for j in jobs if id(j) in todo], launch.data)
    for i, job in enumerate(jobs, 1):
        if id(job) not in todo:
            counts["skipped"] += 1
            if not dry_run:
                log(f"[dim]skip[/] {job.label} (done; --force reruns)")
            continue
        status, forced = todo[id(job)]
        if dry_run:
            print(shlex.join(job_command(job, launch, forced)))
            continue
        log(f"[bold]job {i}/{len(jobs)}[/] {job.label} ({status})")
        try:
            execute(job, launch, forced)
            counts["done"] += 1
        except UserError as e:
            counts["failed"] += 1
            if not keep_going:
                raise
            log(f"[red]failed[/] {job.label}: {e}")
    return counts


# ---------------------------------------------------------------- Slurm (submitit)

@dataclass(frozen=True)
class Cluster:
    """Where and how big each submitted job is (one per recipe)."""

    folder: str = "runs/slurm"  # submitit's logs and pickles
    nodes: int = 1
    gpus_per_node: int = 8
    partition: Optional[str] = None
    timeout_min: int = 72 * 60
    cpus_per_task: int = 10
    account: Optional[str] = None
    cluster: Optional[str] = None  # None/"slurm"; "local" runs each job as a local process (for testing)


class SlurmEntry(submitit.helpers.Checkpointable):
    """What one submitted job runs inside its allocation, once per task (GPU): the recipe's jobs in order.

    A submitit Checkpointable: when Slurm's time limit is near, submitit calls `checkpoint`, which requeues
    the jobs not finished yet, none forced (a forced training that started must resume, not start over);
    the requeued one resumes from the run directory's last checkpoint.
    """

    def __init__(self, recipe_id: str, overrides: tuple, work: list[tuple[str, int, bool]], data: Optional[str]):
        self.recipe_id, self.overrides, self.work, self.data = recipe_id, tuple(overrides), list(work), data
        self.finished: list[tuple[str, int]] = []

    def __call__(self) -> list[str]:
        import os

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from tpcrepro.jobs import run_job

        recipe = load_recipe(self.recipe_id, self.overrides)
        done = []
        for kind, seed, forced in self.work:
            if (kind, seed) in self.finished or (kind != "train" and env.global_rank != 0):
                continue  # flops and throughput: one process measures
            if kind != "train":
                for var in ("WORLD_SIZE", "RANK"):
                    os.environ.pop(var, None)
            run_job(recipe, kind, seed, data_root=self.data, force=forced)
            self.finished.append((kind, seed))
            done.append(f"{self.recipe_id} {kind} seed {seed}")
        return done

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:  # called on the time-limit signal; requeued
        left = [(k, s, False) for k, s, _ in self.work if (k, s) not in self.finished]
        return submitit.helpers.DelayedSubmission(SlurmEntry(self.recipe_id, self.overrides, left, self.data))


def submit(jobs: list[Job], cluster: Cluster, data: Optional[str], force: bool = False) -> list[tuple[str, object]]:
    """One submitit job per recipe with pending work, after the recipes it starts from. Returns (recipe, job)."""
    import submitit

    work: dict[str, list] = {}
    recipes: dict[str, Recipe] = {}
    for job, _, forced in pending(jobs, force):
        work.setdefault(job.recipe.id, []).append((job.kind, job.seed, forced))
        recipes[job.recipe.id] = job.recipe
    submitted: dict[str, object] = {}
    for rid, items in work.items():
        ex = submitit.AutoExecutor(folder=cluster.folder, cluster=cluster.cluster)
        gpus = cluster.gpus_per_node if "train" in {k for k, _, _ in items} else 1
        extra = {}
        dep = recipes[rid].model.init_from
        if dep in submitted and (cluster.cluster or "slurm") == "slurm":
            extra["slurm_additional_parameters"] = {"dependency": f"afterok:{submitted[dep].job_id}"}
        if cluster.account and (cluster.cluster or "slurm") == "slurm":
            extra.setdefault("slurm_additional_parameters", {})["account"] = cluster.account
        ex.update_parameters(name=f"tpcrepro-{rid.replace('/', '-')}", timeout_min=cluster.timeout_min,
                             nodes=cluster.nodes if gpus > 1 else 1, tasks_per_node=gpus,
                             gpus_per_node=gpus if cluster.cluster != "local" else 0,
                             cpus_per_task=cluster.cpus_per_task, **extra)
        if cluster.partition and (cluster.cluster or "slurm") == "slurm":
            ex.update_parameters(slurm_partition=cluster.partition)
        if dep in submitted and cluster.cluster == "local":
            submitted[dep].results()  # the local executor has no dependencies: wait for the base run
        submitted[rid] = ex.submit(SlurmEntry(rid, recipes[rid].overrides, items, data))
        log(f"submitted {rid}: job {submitted[rid].job_id} ({len(items)} jobs, {gpus} GPU(s) per node)")
    return list(submitted.items())
