"""The `tpcrepro` command line. Each command parses options and calls one function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tpcrepro.errors import Interrupted, UserError, raise_on_signals

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Reproduce the tables of TPC-ViT (Token Propagation Controller for Efficient Vision Transformers).\n\n"
         "Profiles: [bold]smoke[/] = digits in scenes made from what ships with scikit-learn and a small ViT, CPU minutes (one job per core); "
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
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands of the jobs that would run and the "
                                 "GPU-hours the recipes state for them, and stop."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Go on to the next job after a failure."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Jobs at once on this machine's CPU cores, each "
                                       "on its recipe's train.threads (smoke: 1; pretraining: 2), its log in "
                                       "runs/logs/ (default: as many as the cores hold on the CPU, 1 on a GPU)."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help="Only these job kinds, comma-separated: train, flops, "
                                        "throughput (e.g. --kinds flops: params and MACs need neither data nor weights)."),
    launcher: str = typer.Option("local", "--launcher", help="local (this machine, torchrun for several GPUs) | "
                                 "slurm (one submitit job per row) | submitit-local (the same through submitit's "
                                 "local executor, to try a cluster set-up on one machine)."),
    nodes: int = typer.Option(1, "--nodes", help="Slurm: nodes per training job."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="Slurm: GPUs (tasks) per node."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition."),
    account: Optional[str] = typer.Option(None, "--account", help="Slurm account."),
    timeout_min: int = typer.Option(72 * 60, "--timeout-min", help="Slurm: time limit per job in minutes "
                                    "(an interrupted run resumes from its checkpoint when submitted again)."),
    slurm_dir: str = typer.Option("runs/slurm", "--slurm-dir", help="Slurm: folder for submitit's logs."),
) -> None:
    """Plan the jobs a table needs, skip the done ones, run the rest, then render the report.

    Resumable: done jobs are skipped and an interrupted training resumes from its last checkpoint.
    """
    from tpcrepro import runner

    launch = runner.Launch(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint, data=data, device=device, jobs=jobs)
    cluster = runner.Cluster(folder=slurm_dir, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition,
                             timeout_min=timeout_min, account=account)
    summary = runner.run_target(target, profile, launch, launcher, cluster, seeds=seeds, kinds=kinds,
                                overrides=tuple(set_ or ()), force=force, dry=dry_run, keep_going=keep_going)
    if summary:
        typer.echo(summary)


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
def report(
    tables_: Optional[List[str]] = typer.Argument(None, metavar="[TABLE]...", help="Tables to render (default: all)."),
    readme: Optional[str] = typer.Option(None, "--readme", help="Also refill this README's generated blocks "
                                         "(<!-- generated: TABLE --> … <!-- /generated -->) with the smoke tables."),
) -> None:
    """Render results/tables/<table>.md from the records: the paper's numbers beside ours."""
    from tpcrepro import report as report_mod

    for p in report_mod.write_all(table_ids=tables_ or None):
        typer.echo(str(p))
    if readme:
        typer.echo(f"{readme}: {report_mod.update_readme(Path(readme))} generated blocks refilled")


@app.command("list")
def list_(
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Only this profile."),
    seeds: Optional[str] = typer.Option(None, help="Seeds a row needs to count as done (default as for run)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Show each table row's status per profile: done, missing, failed, stale, quoted, no recipe."""
    from tpcrepro import runner, status

    rows = status.table_status([profile] if profile else ["smoke", "paper"], lambda p: runner.parse_seeds(seeds, p))
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
    model: str = typer.Option("tpc_deit_s", "--model", "-m",
                              help="tpc_deit_t|s|b, avit_deit_t|s, tpc_lvvit_t|s|m, tpc_swin_t, or a *_smoke one."),
    macs: Optional[float] = typer.Option(None, "--macs", help="Set the gates so the removed forward lands at these "
                                         "mean MACs per image (the paper's DeiT-S point: 2.8e9). Default: the model's own gates."),
    kappa: Optional[int] = typer.Option(None, "--kappa", help="Stabilizer κ (default off)."),
    run: Optional[str] = typer.Option(None, "--run", help="Time the trained model of this recipe's run (seed 0)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Weights to load (a state dict, or with --run its checkpoint)."),
    calib: Optional[int] = typer.Option(None, "--calib", help="Calibrate β once on N separate random images "
                                        "(default: on each timed batch, so it lands at --macs)."),
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Timed at batch 1 and at this size "
                                             "(default 256 on CUDA, 32 on CPU; 1: batch 1 only)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp32."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Time EViT and ToMe at their published settings too."),
    repeats: int = typer.Option(9, "--repeats", min=1, help="Timed repeats per form, interleaved; each ratio is the "
                                "median of the per-repeat ratios, with a distribution-free interval (95 % from 9 on)."),
    schedule: bool = typer.Option(False, "--schedule", help="The fixed-schedule benchmark mode instead (no controller)."),
    spread: float = typer.Option(0.5, "--spread", help="--schedule: per-image counts vary by ± this fraction of the mean."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write records to results/records."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Time the real controller: dense backbone, TPC removed, the same counts replayed, masked, EViT, ToMe, in one run.

    With --macs the gate centre β is bisected so the real removed forward lands there. Every figure is a ratio to
    the dense backbone measured in the same run, at batch 1 and at --batch-size; the records say which form each is.
    """
    from tpcrepro import benchreal, measure, speed

    if schedule:
        out = measure.bench_schedule(model, macs or 2.8e9, kappa, spread, device, batch_size, precision)
        if record:
            measure.write_bench_record(out)
        typer.echo(json.dumps(out) if as_json else measure.describe_bench_schedule(out))
        return
    p = measure.protocol(device, batch_size, precision, False)
    p = speed.Protocol(**{**p.__dict__, "repeats": repeats})
    sizes = list(dict.fromkeys([1, p.batch_size]))
    out = benchreal.run(model, macs, sizes, p, kappa, checkpoint, run, calib, peers)
    if record:
        benchreal.write_records(out)
    typer.echo(json.dumps(out) if as_json else benchreal.describe(out))


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


@app.command()
def figure(
    name: str = typer.Argument(..., help="fig1 (CLS attention per layer) | fig4 (top-1 per epoch with and without "
                               "the stabilizer) | fig5 (token states per layer over the image) | tradeoff (top-1 "
                               "against MACs, each method's knob swept) | samples (a grid of validation scenes, tpcrepro/scenes.py)."),
    recipe: Optional[List[str]] = typer.Option(None, "--recipe", "-r", help="fig1/fig5: the trained run(s) to draw "
                                               "(default smoke/tpc; fig1 also smoke/vit beside it)."),
    seed: int = typer.Option(0, "--seed", help="fig1/fig5: which seed's checkpoint."),
    images: int = typer.Option(4, "--images", help="fig1/fig5: how many evaluation images."),
    profile: str = typer.Option("smoke", "--profile", "-p", help="fig4/tradeoff: whose records (smoke | paper)."),
    data: Optional[str] = DataOpt,
    out: Optional[str] = typer.Option(None, "--out", help="PNG path (default results/figures/<name>.png)."),
) -> None:
    """Draw one of the paper's figures (or the trade-off curves) from records and checkpoints, as PNG."""
    from tpcrepro import figures

    typer.echo(str(figures.draw(name, recipe, seed, images, profile, data, Path(out) if out else None)))


@app.command("convert-checkpoint")
def convert_checkpoint(
    src: Path = typer.Argument(..., help="A .pt/.pth file tpcrepro refuses because it holds numpy or argparse values."),
    dst: Path = typer.Argument(..., help="Where to write the converted file (tensors and plain values only)."),
) -> None:
    """Rewrite a checkpoint that holds numpy values or argparse arguments so that tpcrepro can load it.

    tpcrepro reads checkpoints and weights with torch.load(weights_only=True): tensors and plain values only. DeiT's
    training checkpoints (an argparse.Namespace, numpy scalars) and tpcrepro's own checkpoints of older versions
    (numpy RNG states) are refused. This command reads SRC with the same restricted unpickler, allowing in addition
    only numpy's and argparse's data constructors, so nothing in SRC is executed; it writes DST with numpy arrays as
    tensors and objects as their attribute dicts (anything else dropped, and listed), and checks that DST loads
    safely. A file naming any other Python global is refused: re-save its state dict yourself, from a source you
    trust.
    """
    from tpcrepro import checkpoint

    if not src.is_file():
        raise UserError(f"{src} does not exist; pass the file to convert")
    dropped = checkpoint.convert(src, dst)
    typer.echo(f"{dst}: written, loads with weights_only=True"
               + (f"; dropped (not tensors or plain values): {', '.join(dropped)}" if dropped else ""))


def _is_usage_error(e: Exception) -> bool:
    """Click's usage errors (unknown option, bad value), from click itself or from the copy newer typer vendors."""
    import click

    kinds = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        kinds.append(vendored.ClickException)
    return isinstance(e, tuple(kinds))


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
    raise_on_signals()
    try:
        rc = app(standalone_mode=False)  # typer returns an exit code here (130 for a KeyboardInterrupt)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # Ctrl-C or SIGTERM: the job that was running says how far it got
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; checkpoints and records written so far are kept (rerun to resume)", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        if _is_usage_error(e):
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "tpcrepro"
            print(f"error: {e.format_message()} (see '{where} --help')", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    if isinstance(rc, int) and rc:
        if rc == 130:
            print("interrupted; checkpoints and records written so far are kept (rerun to resume)", file=sys.stderr)
        sys.exit(rc)
