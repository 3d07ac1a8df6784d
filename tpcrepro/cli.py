"""The `tpcrepro` command line. Each command parses options and calls one function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tpcrepro.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Reproduce the tables of TPC-ViT (Token Propagation Controller for Efficient Vision Transformers).\n\n"
         "Profiles: [bold]smoke[/] = the digits data set that ships with scikit-learn and a small ViT, CPU minutes; "
         "[bold]paper[/] = ImageNet-1K at the paper's scale, multi-GPU through torchrun.",
)

@app.callback()
def _root(
    results: Optional[str] = typer.Option(None, "--results", envvar="TPCREPRO_RESULTS",
                                          help="Folder for records/ and tables/ (default: the repository's results/). "
                                               "Use your own to reproduce without mixing your numbers with the committed ones."),
    runs: Optional[str] = typer.Option(None, "--runs", envvar="TPCREPRO_RUNS", help="Folder for checkpoints (default runs/)."),
) -> None:
    import os

    if results:
        os.environ["TPCREPRO_RESULTS"] = str(Path(results).resolve())
    if runs:
        os.environ["TPCREPRO_RUNS"] = str(Path(runs).resolve())


SetOpt = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.lr=1e-3 (repeatable; stored in the record).")
DataOpt = typer.Option(None, "--data", help="ImageFolder root with train/ and val/ (else $TPCREPRO_DATA).")
DeviceOpt = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")


def _seeds(text: Optional[str], profile: str) -> list[int]:
    if text is None:
        return [0, 1, 2] if profile == "smoke" else [0]
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers like 0,1,2, got {text!r}") from None


@app.command()
def run(
    target: str = typer.Argument(..., help="A table (table1 .. table10), 'all', or a recipe id (e.g. smoke/vit)."),
    profile: str = typer.Option("smoke", "--profile", "-p", help="smoke | paper"),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default: 0,1,2 for smoke, 0 for paper)."),
    data: Optional[str] = DataOpt,
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Processes (GPUs) per node for training (torchrun)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes for training (torchrun rendezvous)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank (with --nnodes)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous (with --nnodes)."),
    device: Optional[str] = DeviceOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Rerun jobs that are already done (training starts over)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands of the jobs that would run, and stop."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Go on to the next job after a failure."),
) -> None:
    """Plan the jobs a table needs, skip the done ones, run the rest, then render the report."""
    from tpcrepro import report, runner, tables

    recipes = runner.target_recipes(target, profile, tuple(set_ or ()))
    if not recipes:
        raise UserError(f"{target} has no row tpcrepro can run at profile '{profile}' yet")
    jobs = runner.plan(recipes, _seeds(seeds, profile))
    launch = runner.Launch(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint, data=data, device=device)
    counts = runner.run(jobs, launch, force=force, dry_run=dry_run, keep_going=keep_going)
    if dry_run:
        return
    ids = tables.list_tables() if target == "all" or target not in tables.list_tables() else [target]
    written = report.write_all(table_ids=ids)
    typer.echo(f"{counts['done']} run, {counts['skipped']} already done, {counts['failed']} failed; "
               f"report: {', '.join(str(p) for p in written[:3])}{' ...' if len(written) > 3 else ''}")


@app.command()
def job(
    recipe: str = typer.Argument(..., help="Recipe id, e.g. smoke/vit."),
    kind: str = typer.Option("train", help="train | flops | throughput"),
    seed: int = typer.Option(0, help="Seed (weights, data order, augmentation)."),
    data: Optional[str] = DataOpt,
    device: Optional[str] = DeviceOpt,
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where checkpoints and metrics go (default runs/<recipe>/<hash>/s<seed>)."),
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Start training over instead of resuming."),
) -> None:
    """Run one job and write its record (what `run` launches, also under torchrun)."""
    from tpcrepro.jobs import run_job
    from tpcrepro.recipe import load_recipe

    run_job(load_recipe(recipe, tuple(set_ or ())), kind, seed, data_root=data, run_dir=run_dir, device=device, force=force)


@app.command()
def report(tables_: Optional[List[str]] = typer.Argument(None, metavar="[TABLE]...", help="Tables to render (default: all).")) -> None:
    """Render results/tables/<table>.md from the records: the paper's numbers beside ours."""
    from tpcrepro import report as report_mod

    for p in report_mod.write_all(table_ids=tables_ or None):
        typer.echo(str(p))


@app.command("list")
def list_(
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Only this profile."),
    seeds: Optional[str] = typer.Option(None, help="Seeds a row needs to count as done (default as for run)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Show each table row's status per profile: done, missing, failed, stale, quoted, no recipe."""
    from tpcrepro import status

    rows = status.table_status([profile] if profile else ["smoke", "paper"], lambda p: _seeds(seeds, p))
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r))
    else:
        status.print_status(rows)


@app.command()
def flops(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A timm or tpcrepro model name."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A trained adaptive model's run checkpoint: "
                                             "report the mean over evaluation images of each image's own MACs."),
    data: Optional[str] = DataOpt,
    device: Optional[str] = DeviceOpt,
    img_size: int = typer.Option(224, "--img-size"),
    num_classes: int = typer.Option(1000, "--num-classes"),
    in_chans: int = typer.Option(3, "--in-chans"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Params and MACs (one MAC = one 'FLOP' as the literature counts).

    Static models: fvcore with fused attention off. Adaptive models (tpc_*): with --checkpoint, the mean over the
    evaluation images (the digits for smoke runs, --data for ImageNet) of each image's own count from the analytic
    counter, and the mean tokens computed per layer; without one, the all-tokens count, said so.
    """
    from tpcrepro import measure

    if checkpoint:
        out = measure.adaptive_flops(checkpoint, data, device)
    elif model:
        out = measure.static_flops(model, img_size, num_classes, in_chans)
    else:
        raise UserError("give --model NAME, or --checkpoint runs/<recipe>/<hash>/s<seed>/checkpoint.pt")
    typer.echo(json.dumps(out) if as_json else measure.describe_flops(out))


@app.command()
def throughput(
    model: List[str] = typer.Option(..., "--model", "-m", help="A timm or tpcrepro model name (repeat to time several in one run)."),
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 256 on CUDA, 32 on CPU."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp32 (default bf16 on CUDA, fp32 on CPU)."),
    img_size: int = typer.Option(224, "--img-size"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the models."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Also time this model in the same run and report the ratio."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write a record per model to results/records."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Images/s by one protocol (eval, inference mode, warm-up, synced timing, median of repeats).

    All models given are timed in one process, interleaved repeat by repeat; with --baseline each gets its ratio.
    --json prints one JSON object per model.
    """
    from tpcrepro import measure

    for out in measure.throughput(model, device, batch_size, precision, img_size, compile_, baseline):
        if record:
            measure.write_bench_record(out)
        typer.echo(json.dumps(out) if as_json else measure.describe_throughput(out))


@app.command()
def bench(
    model: str = typer.Option("tpc_deit_s", "--model", "-m", help="A TPC model: tpc_deit_t|s|b or tpc_vit_smoke."),
    macs: float = typer.Option(2.8e9, "--macs", help="Target mean MACs per image (the paper's DeiT-S point: 2.8e9)."),
    kappa: Optional[int] = typer.Option(None, "--kappa", help="Stabilizer κ (default off)."),
    spread: float = typer.Option(0.5, "--spread", help="Per-image token counts vary by ± this fraction of the mean."),
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 256 on CUDA, 32 on CPU."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp32."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write a record to results/records."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Benchmark mode: time a TPC model at a fixed token schedule (random weights) against its dense backbone.

    Speed depends on how many tokens each layer computes, not which: the schedule fixes the per-layer count per
    image (varying around a mean chosen to hit --macs), and the removed form, the masked form and the dense
    backbone are timed in one run. The record says benchmark_mode.
    """
    from tpcrepro import measure

    out = measure.bench(model, macs, kappa, spread, device, batch_size, precision)
    if record:
        measure.write_bench_record(out)
    typer.echo(json.dumps(out) if as_json else measure.describe_bench(out))


@app.command()
def recipes() -> None:
    """List the recipe ids."""
    from tpcrepro.recipe import list_recipes

    for r in list_recipes():
        typer.echo(r)


@app.command()
def show(recipe: str = typer.Argument(...), set_: Optional[List[str]] = SetOpt) -> None:
    """Print a recipe fully resolved (base merged, overrides applied) with its hash."""
    import yaml

    from tpcrepro.recipe import load_recipe

    r = load_recipe(recipe, tuple(set_ or ()))
    typer.echo(f"# {r.id} @ {r.hash}")
    typer.echo(yaml.safe_dump(json.loads(json.dumps(r.to_dict(), default=list)), sort_keys=False))


@app.command()
def models(pattern: str = typer.Argument("*", help="Filter, e.g. 'deit*' or '*smoke*'.")) -> None:
    """List the model names timm and tpcrepro know."""
    import timm

    import tpcrepro.models  # noqa: F401

    for name in timm.list_models(pattern):
        typer.echo(name)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; checkpoints and records written so far are kept (rerun to resume)", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
