"""Commands that train students: train, sweep."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click

from embedcache.errors import ConfigError
from embedcache.fileio import require_writable
from embedcache.limits import WORKERS_MAX

from ._app import main, overrides_option

MAIN_SPLIT = {"lodo": "out_of_domain", "open_vocab": "unseen_zero_shot", "few_shot": "prototype"}
DEMO_SWEEP, DEMO_STORE = "demo", "stores/demo.zarr"


@main.command()
@click.option("--store", help="store made by `embedcache extract`")
@click.option("--recipe", help="recipe name (ce, naive_kd, feat_kd, li_iccv23, vl2v_adip, ...; default: the "
                                 "config's, else li_iccv23)")
@click.option("--student", help="student name (resnet18, test_resnet, timm:<name>, openclip_visual; default: the "
                                  "config's, else resnet18)")
@click.option("--config", "config_path", help="a YAML file, the name of a packaged train config, or a run's "
              "config.json (to train that run again; give --out)")
@click.option("--out", help="run directory (default runs/<recipe>-<student>-<hash>)")
@click.option("--device", help="auto | cpu | cuda | cuda:N (default: the config's, auto)")
@overrides_option("steps=500")
@click.option("--no-progress", is_flag=True)
def train(store, recipe, student, config_path, out, device, overrides, no_progress) -> None:
    """Train a student from a store (never runs the teacher); resumes an interrupted run."""
    from embedcache import interrupt
    from embedcache.config import load_config
    from embedcache.students.rundir import settings_of
    from embedcache.students.train import TrainConfig, train as run

    values = {"store": store, "recipe": recipe, "student.name": student, "out": out, "device": device,
              "progress": False if no_progress else None}
    cfg = load_config(TrainConfig, config_path, overrides, "train", values, adapt=settings_of)
    require_writable(cfg.out if cfg.out is not None else "runs")
    if out is None and _is_run_config(config_path):  # its folder is dropped: said, not left to be found
        click.echo(_where_a_run_config_trains(config_path, cfg))
    def said(signum: int) -> None:  # at once: a step, or the run's set-up, may take a while (a trial: 36 s unsaid)
        click.echo(interrupt.stop_notice(signum, "stopping after this step, its checkpoint saved"), err=True)

    with interrupt.graceful(said):
        res = run(cfg, log=click.echo, should_stop=interrupt.requested)
    if getattr(res, "already_done", False):  # said by the run ("is already done"); no 0-second training line
        return
    val = "n/a" if res.val_top1 is None else f"{100 * res.val_top1:.1f}%"
    if res.val_top1 is not None and res.val_images is not None:  # 0.0% of 18 images read as a broken run (a trial)
        val += f" of {res.val_images} image{'s' if res.val_images != 1 else ''}"
    sel = res.selected or {}
    kept = f"; kept {sel.get('rule')}" + (f" (step {sel['step']})" if sel.get("step") else "") if sel else ""
    took = f"{res.seconds:.1f}s" + (f" this call (resumed at step {res.resumed_from}; summary.json's seconds count "
                                    "every attempt)" if res.resumed_from else "")
    click.echo(f"run {res.out}: {res.steps} steps, validation top-1 {val}{kept}, {took}")


def _where_a_run_config_trains(config_path: str, cfg) -> str:
    """The note for `train --config RUN/config.json` without --out: the run's settings name their own
    default folder, which is that run's when it was trained without --out."""
    from embedcache.students.identity import default_out

    own, target = os.path.dirname(config_path) or ".", default_out(cfg)
    if os.path.realpath(own) == os.path.realpath(target):
        return (f"note: {config_path} is a run's config, and its default folder is that run's own ({own}): it is "
                "resumed there, or found done; --out NEW trains it again in a new folder")
    return (f"note: {config_path} is a run's config: that run is trained again in a new folder, {target} (its own, "
            f"{own}, is neither resumed nor overwritten); --out names the folder")


def _is_run_config(path: Optional[str]) -> bool:
    """Whether ``path`` is a run's own config.json (as a run writes it: its store's key recorded)."""
    import json

    if not path or not path.endswith(".json") or not os.path.isfile(path):
        return False
    try:
        with open(path) as fh:
            return "store_key" in json.load(fh)
    except (OSError, ValueError):
        return False


@main.command()
@click.argument("sweep_file", required=False)
@click.option("--out", help="sweep directory (default sweeps/<file name>)")
@click.option("--launcher", help="serial | local | ray (default: the sweep file's)")
@click.option("--workers", type=click.IntRange(1, WORKERS_MAX), help="local launcher: worker processes")
@click.option("--address", help="ray launcher: cluster address (default: a local Ray instance)")
@click.option("--device", help="auto | cpu | cuda | cuda:N (default: the sweep file's base.device, else auto)")
@overrides_option("grid.seed=[0,1]")
@click.option("--dry-run", is_flag=True, help="check the sweep and count its runs; train and write nothing")
@click.option("--no-progress", is_flag=True)
def sweep(sweep_file, out, launcher, workers, address, device, overrides, dry_run, no_progress) -> None:
    """Run a grid of student runs over a store (resumable; finished runs are skipped), then report.
    SWEEP_FILE is a YAML file or a packaged sweep name; without one, the demo sweep over the demo store."""
    from embedcache.evaluate.protocols import shots_tag
    from embedcache.evaluate.report import headline_metric, markdown, table_notes, transfer_note
    from embedcache.evaluate.store_eval import summary_table
    from embedcache.students.sweep import load_sweep, partial_note, run_sweep

    demo = sweep_file is None
    spec = load_sweep(DEMO_SWEEP if demo else sweep_file, overrides)  # every setting checked before a store is made
    if demo:
        sweep_file = DEMO_SWEEP
        click.echo(f"no sweep file given: running the demo sweep ({DEMO_SWEEP}) over {spec.store}")
    out = out if out is not None else str(Path("sweeps") / Path(sweep_file).stem)
    require_writable(out, probe=not dry_run)
    if demo and Path(spec.store) == Path(DEMO_STORE):  # not with --set store=another
        _ensure_demo_store(no_progress, dry_run)
    res = run_sweep(spec, out, launcher, device, progress=not no_progress, log=click.echo,
                    workers=workers, address=address, dry_run=dry_run)
    if dry_run:
        shared = f", by this launch and the one running into {out} now" if res["running"] else ""
        click.echo(f"dry run: {res['runs']} runs in {out}, {res['finished']} already finished, "
                   f"{res['runs'] - res['finished']} to train{shared}; nothing was trained or written")
        return
    click.echo(f"{res['runs']} runs: {res['done']} done now, {res['skipped']} already done, {res['failed']} failed, "
               f"{res['busy']} left to other workers")
    if res["results"] is not None:
        note = partial_note(out, [Path(p).name for p in res["run_dirs"]], res["results"])
        if note:
            click.echo(f"warning: {note}")
        split = MAIN_SPLIT[spec.protocol] + (shots_tag(spec.shots) if spec.protocol == "few_shot" else "")
        if headline_metric(split) == "mean_per_class":
            click.echo(f"{split}: mean per-class accuracy (%), as Li et al. report it")
        table, shown = summary_table(res["results"], split, headline_metric(split)), [split]
        if not len(table):  # nothing held out of the runs' own store (scored on transfer stores): every split
            table, shown = summary_table(res["results"]), sorted(set(res["results"]["split"]))
        if transfer_note(res["results"]):
            click.echo(transfer_note(res["results"]))
        click.echo(markdown(table))
        for line in [line for s in shown for line in table_notes(res["results"], s)]:  # said during the runs,
            click.echo(f"warning: {line}")  # amid their progress bars (a trial)
        if res["wrote"]:  # else a later launch's grid owns them (said above): not this table's files (a trial)
            click.echo(f"results: {out}/results.parquet; report: {out}/report/report.md")
    if res["failed"]:
        sys.exit(1)


def _ensure_demo_store(no_progress: bool, dry_run: bool = False) -> None:
    from embedcache.config import load_extract_config
    from embedcache.extract import extract
    from embedcache.store import Store

    if Store.exists(DEMO_STORE):
        with Store(DEMO_STORE) as st:
            if st.complete:
                return
    if dry_run:  # which writes nothing
        raise ConfigError(f"the demo sweep's store {DEMO_STORE} is not made yet, and a dry run makes nothing: run "
                          "`make extract` first, or the sweep without --dry-run, which makes it first")
    click.echo(f"{DEMO_STORE} is missing: extracting the demo store first (embedcache extract --config demo)")
    extract(load_extract_config("demo", values={"out": DEMO_STORE, "progress": False if no_progress else None}),
            log=click.echo)
