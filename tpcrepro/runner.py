"""Plan the jobs a table (or recipe) needs, skip the done ones, launch the rest.

`run_target` is what `tpcrepro run` does: `plan_target` (the recipes, seeds
and job kinds of a target, once), then one launcher: `dry_run` (print),
`run_local` (training jobs on several processes go through torchrun, one
machine with --nproc-per-node, several with torchrun's rendezvous options;
everything else runs in this process) or `run_cluster` (on a Slurm cluster,
one job per recipe, i.e. per row, through submitit, as DeiT's own scripts do).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional

import submitit.helpers

from tpcrepro import pool, records, tables
from tpcrepro.errors import Interrupted, UserError
from tpcrepro.progress import log
from tpcrepro.recipe import JOB_KINDS, Recipe, load_recipe, recipe_path

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
    """Where the local launcher runs training jobs (torchrun's processes and nodes) and on what."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: Optional[int] = None
    rdzv_endpoint: Optional[str] = None
    data: Optional[str] = None
    device: Optional[str] = None
    jobs: Optional[int] = None  # jobs at once on the CPU cores (tpcrepro.pool); None: as many as the cores hold

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def at_once(self) -> int:
        """How many jobs run side by side here: several only on the CPU, never under torchrun or on a GPU."""
        if self.distributed:
            return 1
        if self.jobs is not None:
            return max(1, self.jobs)
        on_gpu = self.device.startswith("cuda") if self.device else _cuda()
        return 1 if on_gpu else pool.machine_cores()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Invocation:
    """How one job runs: `where` is "process" (run_job in this process) or "torchrun" (processes it starts)."""

    job: Job
    where: str
    args: tuple  # the `tpcrepro` arguments: job <recipe> --kind ... --seed ...
    torchrun: tuple = ()  # torchrun's own arguments (where == "torchrun")
    force: bool = False

    def command(self) -> list[str]:
        """The command line a user would type (what --dry-run prints)."""
        if self.where == "process":
            return ["tpcrepro", *self.args]
        return ["torchrun", *self.torchrun, "-m", "tpcrepro", *self.args]


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
            dep_seeds = seeds if r.model.init_seed is None else [r.model.init_seed]
            jobs += [Job(dep, "train", s, dependency=True) for s in dep_seeds]
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


def invocation(job: Job, launch: Launch, force: bool = False) -> Invocation:
    """How `job` runs: under torchrun when it is a training that spans processes, else in this process."""
    args = ["job", job.recipe.id, "--kind", job.kind, "--seed", str(job.seed)] + (["--force"] if force else [])
    for o in job.recipe.overrides:
        args += ["--set", o]
    if launch.data:
        args += ["--data", launch.data]
    if launch.device:
        args += ["--device", launch.device]
    if job.kind != "train" or not launch.distributed:
        return Invocation(job, "process", tuple(args), force=force)
    run = [f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes > 1:
        run += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
        run += [f"--rdzv-id={job.recipe.id.replace('/', '_')}"]
        if launch.node_rank is not None:
            run += [f"--node-rank={launch.node_rank}"]
    return Invocation(job, "torchrun", tuple(args), tuple(run), force)


def job_command(job: Job, launch: Launch, force: bool = False) -> list[str]:
    """The command line that runs one job: `tpcrepro job ...`, under torchrun when it spans processes."""
    return invocation(job, launch, force).command()


def execute(job: Job, launch: Launch, force: bool = False) -> None:
    inv = invocation(job, launch, force)
    if inv.where == "process":
        from tpcrepro.jobs import run_job

        run_job(job.recipe, job.kind, job.seed, data_root=launch.data, device=launch.device, force=force)
        return
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise UserError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", *inv.torchrun, "-m", "tpcrepro", *inv.args]
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


def recorded_durations(jobs: list[Job]) -> tuple[Callable, list[str]]:
    """(seconds(job), recipes never run): each job's newest done record here, of its recipe, kind and seed, else of
    any seed; 0 for a job never run. With --results elsewhere, the repository's committed records count too."""
    from tpcrepro import paths

    committed = paths.ROOT / "results" / "records"
    found = records.load_records()
    if committed.resolve() != paths.records_dir().resolve() and committed.is_dir():
        found += records.load_records(committed)
    newest: dict = {}
    for r in found:
        if r.status == "done" and r.duration_s is not None:
            for key in ((r.recipe, r.profile, r.kind), (r.recipe, r.profile, r.kind, r.seed)):
                if key not in newest or r.started_at > newest[key].started_at:
                    newest[key] = r
    unknown = list(dict.fromkeys(j.recipe.id for j in jobs if (j.recipe.id, j.recipe.profile, j.kind) not in newest))

    def took(j: Job) -> float:
        key = (j.recipe.id, j.recipe.profile, j.kind)
        rec = newest.get((*key, j.seed)) or newest.get(key)
        return rec.duration_s if rec is not None else 0.0

    return took, unknown


def measured_seconds(jobs: list[Job], cores: Optional[int] = None, limit: Optional[int] = None) -> tuple[float, list[str]]:
    """What `jobs` took when last run here (`recorded_durations`).

    cores: the wall clock of `run --jobs limit` on that many cores (the pool's rules, simulated); None: one after
    another.
    Returns (seconds, recipes never run). On the machine that made the records this is the cost of a fresh run.
    """
    took, unknown = recorded_durations(jobs)
    if cores is None:
        return sum(map(took, jobs)), unknown
    return pool.makespan(jobs, took, cores, limit), unknown


def check_data(jobs: list[Job], data: Optional[str]) -> None:
    """Every training job's data directory exists (before any job starts, weights are fetched or time is spent)."""
    from tpcrepro import data as data_mod

    for j in jobs:
        if j.kind == "train":  # an embedded data set has no directory: resolve_root passes it
            data_mod.resolve_root(j.recipe.data, data)


def run(jobs: list[Job], launch: Launch, force: bool = False, dry_run: bool = False,
        keep_going: bool = False) -> dict[str, int]:
    """Run the jobs that are not done (all with force); return counts by outcome."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    todo = {id(j): (status, forced) for j, status, forced in pending(jobs, force)}
    if not dry_run:
        check_data([j for j in jobs if id(j) in todo], launch.data)
    at_once = 1 if dry_run else launch.at_once()
    trainings = sum(j.kind == "train" for j in jobs if id(j) in todo)
    if at_once > 1 and trainings > 1:  # side by side, each its own process on its recipe's threads (else: here)
        for job in jobs:
            if id(job) not in todo:
                counts["skipped"] += 1
                log(f"[dim]skip[/] {job.label} (done; --force reruns)")
        ordered = [j for j in jobs if id(j) in todo]
        log(f"{len(ordered)} job(s), up to {at_once} at once on {pool.machine_cores()} core(s)")
        got = pool.run_pool(ordered, lambda j: list(invocation(j, launch, todo[id(j)][1]).args),
                            pool.machine_cores(), at_once, keep_going, recorded_durations(ordered)[0])
        counts["done"], counts["failed"] = got["done"], got["failed"]
        return counts
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


# ---------------------------------------------------------------- `tpcrepro run`: plan, then launch

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class Plan:
    """What `run TARGET` does: the jobs in order, the tables timed side by side, the tables rendered after."""

    target: str
    profile: str
    jobs: list
    kinds: Optional[tuple]  # only these job kinds (None: every kind a recipe lists)
    speed_tables: tuple  # tables whose speed column comes from one side-by-side protocol, not one job per model
    report_tables: list  # the tables `report` renders when the jobs are done


def parse_seeds(text: Optional[str], profile: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; None: 0, 1, 2 for smoke, 0 for paper."""
    if text is None:
        return [0, 1, 2] if profile == "smoke" else [0]
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers like 0,1,2, got {text!r}") from None


def parse_kinds(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    wanted = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in wanted if k not in JOB_KINDS]
    if bad:
        raise UserError(f"--kinds takes {', '.join(JOB_KINDS)}; got '{bad[0]}'")
    return wanted


def plan_target(target: str, profile: str, seeds: Optional[str] = None, kinds: Optional[str] = None,
                overrides: tuple = ()) -> Plan:
    """The recipes a target needs, their jobs for the seeds (default: the table's own smoke seeds, its cost)."""
    recipes = target_recipes(target, profile, overrides)
    if not recipes:
        raise UserError(f"{target} has no row tpcrepro can run at profile '{profile}' yet")
    wanted = parse_kinds(kinds)
    all_tables = tables.list_tables()
    specs = {t: tables.load_table(t) for t in (all_tables if target == "all" else [target] if target in all_tables else [])}
    if seeds is None and profile == "smoke" and target in specs and specs[target].smoke_seeds:
        seeds = ",".join(map(str, specs[target].smoke_seeds))
    jobs = plan(recipes, parse_seeds(seeds, profile), wanted)
    speed = tuple(t for t, spec in specs.items() if any(c.key == "images_per_sec" for c in spec.columns))
    if speed:  # their speed comes from one side-by-side protocol, not from one job per model
        jobs = [j for j in jobs if j.kind != "throughput"]
    report_tables = [target] if target in all_tables else all_tables
    return Plan(target, profile, jobs, wanted, speed, report_tables)


def dry_run(p: Plan, launch: Launch, force: bool = False) -> None:
    """Print the commands of the jobs that would run (stdout) and what they cost (stderr)."""
    todo = [j for j, _, _ in pending(p.jobs, force)]
    run(p.jobs, launch, force=force, dry_run=True)
    if p.profile == "paper":
        hours, unknown = gpu_hours(todo)
        print(f"# {len(todo)} job(s) to run; stated cost {hours:,.1f} A100-class GPU-hours"
              + (f" (no cost stated: {', '.join(unknown)})" if unknown else ""), file=sys.stderr)
    else:
        at_once = launch.at_once()
        cores = min(at_once, pool.machine_cores())  # the pool's cores, or one job after another
        secs, unknown = measured_seconds(todo, cores, at_once)
        fresh, _ = measured_seconds(p.jobs, cores, at_once)
        serial, _ = measured_seconds(p.jobs)
        print(f"# {len(todo)} job(s) to run, {secs / 60:.1f} min by the records' durations, up to {at_once} at once "
              f"(a fresh run of all {len(p.jobs)}: {fresh / 60:.1f} min; one after another: {serial / 60:.1f} min)"
              + (f"; never run here: {', '.join(unknown)}" if unknown else ""), file=sys.stderr)


def speed_protocol(table_id: str, profile: str, device: Optional[str], force: bool) -> None:
    """Run a table's side-by-side speed protocol unless its records are there (for the current recipes)."""
    from tpcrepro import speedtable

    if speedtable.is_done(table_id, profile) and not force:
        print(f"{table_id}: speed already measured side by side (--force remeasures)")
        return
    print(f"speed grid: {speedtable.measure(table_id, profile, device)}")


def run_local(p: Plan, launch: Launch, force: bool = False, keep_going: bool = False) -> str:
    """The jobs on this machine, then the speed protocols and the report. Returns the summary line."""
    from tpcrepro import report

    counts = run(p.jobs, launch, force=force, keep_going=keep_going)
    if p.kinds is None or "throughput" in p.kinds:
        for tid in p.speed_tables:
            speed_protocol(tid, p.profile, launch.device, force)
    written = report.write_all(table_ids=p.report_tables)
    return (f"{counts['done']} run, {counts['skipped']} already done, {counts['failed']} failed; "
            f"report: {', '.join(str(x) for x in written[:3])}{' ...' if len(written) > 3 else ''}")


def run_cluster(p: Plan, cluster: "Cluster", data: Optional[str], force: bool = False) -> str:
    """One submitit job per recipe; with the local executor, wait for them and render the report."""
    submitted = submit(p.jobs, cluster, data, force)
    if cluster.cluster == "local":
        from tpcrepro import report

        for _, sj in submitted:
            sj.results()
        report.write_all(table_ids=p.report_tables)
    return f"{len(submitted)} job(s) submitted; `tpcrepro list` shows progress, `tpcrepro report` renders the tables"


def run_target(target: str, profile: str, launch: Launch, launcher: str = "local", cluster: Optional["Cluster"] = None,
               seeds: Optional[str] = None, kinds: Optional[str] = None, overrides: tuple = (), force: bool = False,
               dry: bool = False, keep_going: bool = False) -> Optional[str]:
    """`tpcrepro run`: plan the target, then print the plan, run it here, or submit it. Returns the summary line."""
    p = plan_target(target, profile, seeds, kinds, overrides)
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher is local, slurm or submitit-local, got '{launcher}'")
    if dry:
        dry_run(p, launch, force)
        return None
    if launcher != "local":
        cluster = replace(cluster or Cluster(), cluster="local" if launcher == "submitit-local" else "slurm")
        return run_cluster(p, cluster, launch.data, force)
    return run_local(p, launch, force, keep_going)


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
