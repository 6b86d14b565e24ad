"""The ``embedcache`` command line: parse, call the library, print. No logic lives here."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import click

from .errors import EmbedcacheError


class _Group(click.Group):
    """Prints an EmbedcacheError as one line on stderr and exits 2, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EmbedcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="embedcache")
def main() -> None:
    """Cache a vision-language teacher's embeddings once; distil students from the cache."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML under configs/extract/")
@click.option("--out", help="store path (.zarr folder, or .h5 for HDF5)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key, e.g. views.count=4")
@click.option("--shard", type=int, help="this worker's index (default: $RANK, else 0)")
@click.option("--num-shards", type=int, help="number of workers filling the store (default: $WORLD_SIZE, else 1)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def extract(config_path: Optional[str], out: Optional[str], overrides: Sequence[str], shard, num_shards, no_progress) -> None:
    """Run the teacher once over a dataset and write a store (resumes if interrupted)."""
    from .config import load_extract_config, replace
    from .extract import extract as run

    cfg = load_extract_config(config_path, overrides)
    changes = {k: v for k, v in {"out": out, "shard": shard, "num_shards": num_shards}.items() if v is not None}
    if no_progress:
        changes["progress"] = False
    res = run(replace(cfg, **changes), log=click.echo)
    if not res.skipped:
        rate = res.images / res.seconds if res.seconds > 0 else 0.0
        click.echo(f"{res.images} images encoded in {res.seconds:.1f}s ({rate:.1f} images/s); "
                   f"{res.failed} unreadable; store {'complete' if res.complete else 'partial'}: {res.path}")


@main.command()
@click.argument("store", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect(store: str, as_json: bool) -> None:
    """Summarise a store: teacher, images, views, domains, classes, failures, disk size."""
    import json

    from .api import open_store
    from .store import Store

    st = Store(store)
    if not st.complete:
        done = int(st.blocks_done().sum())
        click.echo(f"{store}: incomplete ({done} of {st.layout['num_blocks']} blocks); rerun its extract command to finish")
        st.close()
        sys.exit(1)
    st.close()
    with open_store(store) as reader:
        summary = reader.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.option("--store", help="store made by `embedcache extract`")
@click.option("--recipe", help="recipe name (ce, naive_kd, feat_kd, li_iccv23, vl2v_adip, ...)")
@click.option("--student", help="student name (resnet18, test_resnet, timm:<name>, openclip_visual)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML train config")
@click.option("--out", help="run directory (default runs/<recipe>-<student>-<hash>)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override, e.g. steps=500 optim.lr=3e-4")
@click.option("--no-progress", is_flag=True)
def train(store, recipe, student, config_path, out, overrides, no_progress) -> None:
    """Train a student from a store (never runs the teacher); resumes an interrupted run."""
    from students.train import TrainConfig, train as run
    from .config import load_config

    extra = [f"{k}={v}" for k, v in (("store", store), ("recipe", recipe), ("student.name", student), ("out", out)) if v]
    if no_progress:
        extra.append("progress=false")
    res = run(load_config(TrainConfig, config_path, list(overrides) + extra, "configs/train/"), log=click.echo)
    val = "n/a" if res.val_top1 is None else f"{res.val_top1:.4f}"
    click.echo(f"run {res.out}: {res.steps} steps, validation top-1 {val}, {res.seconds:.1f}s")


@main.command()
@click.option("--store", required=True, help="store to add the features to")
@click.option("--student", required=True, help="student backbone name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="student settings: pretrained=/path, input_size=160, seed=0, batch_size=64, device=cpu")
@click.option("--no-progress", is_flag=True)
def features(store, student, overrides, no_progress) -> None:
    """Cache frozen student-backbone features per view in a store, for head-only training."""
    from students.features import cache_features
    from students.models import StudentConfig
    from .config import apply_overrides, build_config

    opts = apply_overrides({}, overrides)
    run_opts = {k: opts.pop(k) for k in ("seed", "batch_size", "device") if k in opts}
    cfg = build_config(StudentConfig, {**opts, "name": student})
    cache_features(store, cfg, progress=not no_progress, log=click.echo, **run_opts)


def _runs(paths):
    """Run directories among ``paths``: each path is a run (has config.json) or a folder of runs."""
    from pathlib import Path

    out = []
    for p in map(Path, paths):
        out += [p] if (p / "config.json").exists() else sorted(q.parent for q in p.glob("*/config.json"))
    return out


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--store", help="store to score (required for teacher baselines; default for runs: their own)")
@click.option("--protocol", "protocols", multiple=True, default=("lodo",), show_default=True,
              help="lodo | open_vocab | few_shot (repeatable)")
@click.option("--source", "sources", multiple=True, help="text sources for teacher baselines (default: all)")
@click.option("--out", default="results.parquet", show_default=True, help="tidy results file (appended to)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--finetune-steps", default=50, show_default=True,
              help="with few_shot on runs: also fine-tune the student on the shots for this many steps (0: skip)")
def evaluate(runs, store, protocols, sources, out, device, finetune_steps) -> None:
    """Score finished runs (or, with only --store, the teacher's zero-shot baselines)."""
    from pathlib import Path

    import pandas as pd

    from evaluate.report import markdown
    from evaluate.store_eval import evaluate_run, summary_table, teacher_baselines
    from students.embed import embed_store

    frames = []
    if not runs:
        if not store:
            raise click.UsageError("give run directories, or --store for the teacher's baselines")
        frames.append(teacher_baselines(store, sources or None, protocols))
    for run in _runs(runs):
        if not (run / "done").exists():
            click.echo(f"skipping {run}: not finished", err=True)
            continue
        import json
        cfg_store = store or json.loads((run / "config.json").read_text())["store"]
        scored = evaluate_run(str(run), protocols, cfg_store, embed_store(str(run), cfg_store, device))
        frames.append(scored)
        if "few_shot" in protocols and finetune_steps > 0:
            from students.finetune import few_shot_finetune

            ft = few_shot_finetune(str(run), cfg_store, steps=finetune_steps, device=device)
            tags = scored.iloc[0][["run", "recipe", "student", "seed", "source"]].to_dict()
            frames.append(ft.assign(protocol="few_shot", **tags))
    if not frames:
        raise click.UsageError("nothing to evaluate: no finished run found")
    res = pd.concat(frames, ignore_index=True)
    if Path(out).exists():
        res = pd.concat([pd.read_parquet(out), res], ignore_index=True)
    res.to_parquet(out, index=False)
    click.echo(markdown(summary_table(res)))
    click.echo(f"\n{len(res)} rows in {out}")


@main.command()
@click.argument("results", type=click.Path(exists=True))
@click.option("--out", "out_dir", help="folder for report.md and PNG plots (default: report/, or SWEEP_DIR/report)")
def report(results, out_dir) -> None:
    """Turn a results file, or a sweep directory, into markdown tables (methods x domains, mean ± std) and plots."""
    from pathlib import Path

    import pandas as pd

    from evaluate.report import write_report

    if Path(results).is_dir():
        from students.sweep import collect

        df, out_dir = collect(results), out_dir or str(Path(results) / "report")
    else:
        df, out_dir = pd.read_parquet(results), out_dir or "report"
    for f in write_report(df, out_dir):
        click.echo(str(f))


MAIN_SPLIT = {"lodo": "out_of_domain", "open_vocab": "unseen_zero_shot", "few_shot": "prototype"}


@main.command()
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", help="sweep directory (default sweeps/<file name>)")
@click.option("--launcher", help="serial | local | ray (default: the sweep file's)")
@click.option("--workers", type=int, help="local launcher: worker processes")
@click.option("--address", help="ray launcher: cluster address (default: a local Ray instance)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a sweep key, e.g. base.steps=50")
@click.option("--no-progress", is_flag=True)
def sweep(sweep_file, out, launcher, workers, address, device, overrides, no_progress) -> None:
    """Run a grid of student runs over a store (resumable; finished runs are skipped), then report."""
    from pathlib import Path

    from evaluate.report import markdown
    from evaluate.store_eval import summary_table
    from students.sweep import load_sweep, run_sweep

    spec = load_sweep(sweep_file, overrides)
    out = out or str(Path("sweeps") / Path(sweep_file).stem)
    extra = {k: v for k, v in (("workers", workers), ("address", address)) if v is not None}
    res = run_sweep(spec, out, launcher, device, progress=not no_progress, log=click.echo, **extra)
    click.echo(f"{res['runs']} runs: {res['done']} done now, {res['skipped']} already done, {res['failed']} failed, "
               f"{res['busy']} left to other workers")
    if res["results"] is not None:
        click.echo(markdown(summary_table(res["results"], MAIN_SPLIT[spec.protocol])))
        click.echo(f"results: {out}/results.parquet; report: {out}/report/report.md")
    if res["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
