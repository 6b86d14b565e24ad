"""Commands that score: evaluate, report."""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path

import click

from embedcache.fileio import require_writable
from embedcache.limits import SEED_MAX

from ._app import main


class _Fraction(click.FloatRange):
    """click's FloatRange lets nan through its bounds (every comparison with nan is false)."""

    def convert(self, value, param, ctx):
        out = super().convert(value, param, ctx)
        if math.isnan(out):
            self.fail(f"{value!r} is not a number; give one between {self.min} and {self.max}", param, ctx)
        return out


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--store", help="store to score (required for teacher baselines; default for runs: their own)")
@click.option("--protocol", "protocols", multiple=True, default=("lodo",), show_default=True,
              help="lodo | open_vocab | few_shot | per_class | distill (repeatable)")
@click.option("--source", "sources", multiple=True, help="text sources for teacher baselines (default: all)")
@click.option("--out", default="results.parquet", show_default=True,
              help="tidy results file (updated: a run's rows of each protocol, store and holdout it scores are "
                   "replaced whole; rows of other fine-tuning steps or shot counts stay)")
@click.option("--device", default="auto", show_default=True)
@click.option("--shots", type=click.IntRange(min=1), default=5, show_default=True,
              help="few_shot: labelled images per unseen class (Li et al.: 5; rows of other counts carry theirs in "
                   "their split, e.g. prototype@1shot)")
@click.option("--finetune-steps", type=click.IntRange(min=0), default=50, show_default=True,
              help="with few_shot on runs: also fine-tune the student on the shots for this many steps (0: skip)")
@click.option("--finetune-mode", type=click.Choice(["shots", "mixed"]), default="shots", show_default=True,
              help="shots: L_cls on the shots; mixed: shots mixed into training batches, full loss (Li et al.)")
@click.option("--unseen-fraction", type=_Fraction(0.0, 0.99, min_open=True), default=0.5, show_default=True,
              help="teacher baselines of open_vocab/few_shot: the share of classes held out "
                   "(the sweep's unseen_fraction)")
@click.option("--split-seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
              help="teacher baselines of open_vocab/few_shot: the class split's seed, as the sweep's split_seed")
@click.option("--seen-classes", help="teacher baselines of open_vocab/few_shot: the seen classes, comma-separated "
                                     "(a run's split.train_classes), instead of the seeded split; the rest are held out")
@click.option("--transfer", is_flag=True,
              help="score runs on --store, another store of the same teacher, classes and prompts (e.g. real "
                   "images for a student distilled on synthesised ones): every image there is a test image")
def evaluate(runs, store, protocols, sources, out, device, shots, finetune_steps, finetune_mode, unseen_fraction,
             split_seed, seen_classes, transfer) -> None:
    """Score finished runs (or, with only --store, the teacher's zero-shot baselines)."""
    import pandas as pd

    from embedcache.device import resolve_device
    from embedcache.errors import EvaluationError
    from embedcache.evaluate.protocols import PROTOCOLS
    from embedcache.evaluate.results import read_results, upsert
    from embedcache.evaluate.store_eval import teacher_baselines
    from embedcache.students.rundir import RunDir, distinct_runs
    from embedcache.students.scoring import score_runs

    for p in protocols:
        PROTOCOLS.check(p)
    if Path(out).suffix != ".parquet":
        raise click.UsageError(f"--out {out}: results are one parquet table; give a .parquet file (pandas reads it "
                               "with pd.read_parquet; `embedcache report` makes markdown tables of it)")
    require_writable(out)  # before the scoring: a file in the way, a folder that cannot be written
    if Path(out).exists():
        read_results(out)  # a file that is not a results table is refused now, not after the scoring
    _refuse_unused(runs, store, protocols, sources, transfer, seen_classes, _given("unseen_fraction", "split_seed"),
                   bool(_given("device")))
    if runs:
        resolve_device(device)  # a device that is no device: refused before any run is scored
    _refuse_unused_few_shot(runs, protocols)
    options = {"few_shot": {"shots": shots}}
    frames = []
    found = distinct_runs(RunDir.find(runs))
    finished = sum(run.done for run in found)  # one finished run: what stops it is the error
    try:
        if not runs:
            seen = _seen_list(seen_classes)
            frames.append(teacher_baselines(store, sources or None, protocols, options, unseen_fraction=unseen_fraction,
                                            split_seed=split_seed, seen_classes=seen))
        with _each_run_warning_once():
            scored, unscored = score_runs(found, protocols, log=lambda line: click.echo(line, err=True), store=store,
                                          device=device, options=options, finetune_mode=finetune_mode,
                                          finetune_steps=finetune_steps if "few_shot" in protocols else 0,
                                          transfer=transfer)
            frames += scored
    except KeyboardInterrupt:  # "rerun to resume" was said: the table is written once, at the end
        raise KeyboardInterrupt(f"interrupted; nothing was written to {out} (it is written once everything is "
                                "scored): rerun the same command to score again") from None
    if not frames:
        from embedcache.store import Store

        stores = [r for r in runs if Store.exists(r)]
        if stores:
            raise click.UsageError(f"{stores[0]} is a store, not a run: give it as --store {stores[0]} for the teacher's "
                                   "baselines, or give the runs trained on it")
        if unscored:
            raise EvaluationError(f"none of the {finished} finished runs could be scored: {unscored[0]}"
                                  " (the others' reasons are above)")
        raise click.UsageError(_nothing_found(runs, found))
    new = pd.concat(frames, ignore_index=True)
    table = upsert(out, new)
    _say_tables(new, protocols, out)
    _say_settings(found, new)
    click.echo(f"\n{len(new)} rows scored; {len(table)} rows in {out}")
    if finished == 1 and unscored:  # the other protocols' rows are written and shown; the one that failed is the error
        raise EvaluationError(f"{unscored[0]} (the rows of the other protocols are in {out})")


def _say_tables(new, protocols, out) -> None:
    """The printed tables of what was scored: top-1 by domain, and mean per-class accuracy where the papers
    report it (a lone run that one protocol could not score printed none of the others', a trial)."""
    from embedcache.evaluate.report import few_image_lines, headline_metric, markdown, table_splits, transfer_note
    from embedcache.evaluate.store_eval import avg_said, class_split_note, method_frame, method_keys, summary_table

    summary = summary_table(new)
    if len(summary):
        for line in (transfer_note(new), class_split_note(method_frame(new))):
            if line:
                click.echo(line)
        click.echo(f"top-1 accuracy (%), mean ± std over replicates{avg_said(summary)}:")
        click.echo(markdown(summary))
        framed = method_frame(new)
        keys = method_keys(framed)
        for line in [line for split in table_splits(framed) for line in few_image_lines(framed, split, keys) if line]:
            click.echo(f"note: {line}")  # (a collapse is said as each run is scored)
        by_class = new[new["split"].map(headline_metric) == "mean_per_class"]
        if len(by_class):  # the class-held-out splits as Li et al. report them
            table = summary_table(by_class, metric="mean_per_class")
            click.echo(f"\nmean per-class accuracy (%), the open-vocabulary and few-shot papers' metric{avg_said(table)}:")
            click.echo(markdown(table))
    else:  # per_class and distill rows only: no methods x domains table to print
        click.echo(f"no accuracy-by-domain table for {', '.join(protocols)}; `embedcache report {out}` shows their tables")


def _say_settings(found, new) -> None:
    """Under the tables: what tells apart the settings digests of runs of one method name (``settings_legend``)."""
    from embedcache.students.scoring import settings_legend

    lines = settings_legend(found, new)
    if lines:
        click.echo("\nruns of one method name trained with other settings (the tables' settings column), and "
                   "what tells them apart:")
        for line in lines:
            click.echo(f"  {line}")


@contextmanager
def _each_run_warning_once():
    """A warning said of many runs alike ("run r3: no loss of recipe linear_probe trains its embedding
    ...") is shown for the first; the runs it was also said of are named in one line at the end,
    not the same paragraph once per run."""
    import warnings

    from embedcache.evaluate.protocols import SAID_OF_A_RUN

    shown, also = warnings.showwarning, {}

    def show(message, category, filename, lineno, file=None, line=None):
        said = SAID_OF_A_RUN.match(str(message))
        if said is None or said.group(2) not in also:
            if said is not None:
                also[said.group(2)] = [said.group(1)]
            return shown(message, category, filename, lineno, file, line)
        also[said.group(2)].append(said.group(1))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
        for text, (first, *runs) in also.items():
            if runs:
                named = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
                gist = re.split(r" \(|[;,:] ", text, maxsplit=1)[0]  # its first clause
                gist = gist if len(gist) <= 60 else gist[:60].rsplit(" ", 1)[0] + " ..."
                click.echo(f"warning: run{'s' if len(runs) > 1 else ''} {named}: the same as run {first} above "
                           f"({gist})", err=True)


def _refuse_unused(runs, store, protocols, sources, transfer: bool, seen_classes, drawn: list,
                   device_given: bool) -> None:
    """Options that would be ignored in this call are refused: the result would not be what was asked."""
    from embedcache.evaluate.protocols import CLASS_SPLIT

    if not runs and not store:
        raise click.UsageError("give run directories, or --store for the teacher's baselines")
    if device_given and not runs:  # ('gpu' wrote its table, exit 0: a fuzz)
        raise click.UsageError("--device sets where runs are scored; the teacher's baselines read the store's "
                               "embeddings on the CPU: drop --device")
    if transfer and not (runs and store):
        raise click.UsageError("--transfer scores runs on another store: give it as --store PATH, with the runs"
                               if runs else "--transfer scores runs on another store; the teacher's baselines score "
                               "--store itself: drop --transfer, or give the runs")
    if sources and runs:
        raise click.UsageError("--source sets the teacher's baselines' text sources; a run predicts with the text "
                               "source it trained with: drop --source, or score the teacher with --store alone")
    split = seen_classes is not None or bool(drawn)
    if split and runs:
        raise click.UsageError("--unseen-fraction, --split-seed and --seen-classes set the teacher's class split; runs "
                               "are scored on the classes they held out themselves")
    if split and not set(protocols) & set(CLASS_SPLIT):
        raise click.UsageError(f"--unseen-fraction, --split-seed and --seen-classes hold classes out, which only "
                               f"{' and '.join(CLASS_SPLIT)} score; add --protocol open_vocab, or drop them")
    if seen_classes is not None and drawn:
        raise click.UsageError("--seen-classes names the class split; --unseen-fraction and --split-seed draw one: "
                               "give one or the other")


def _given(*params: str) -> list:
    """The options of ``params`` given on the command line (at their defaults too), as --names."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return [f"--{p.replace('_', '-')}" for p in params if ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE]


def _refuse_unused_few_shot(runs, protocols) -> None:
    """--shots sets the few_shot protocol; --finetune-steps and --finetune-mode fine-tune runs under it
    (the teacher has no student to fine-tune). Given where nothing reads them, they are refused."""
    ctx = click.get_current_context()
    given = _given("shots", "finetune_steps", "finetune_mode")
    if "few_shot" not in protocols and given:
        raise click.UsageError(f"{given[0]} sets few-shot scoring; add --protocol few_shot, or drop it")
    tuning = [g for g in given if g != "--shots"]
    if not runs and tuning:
        raise click.UsageError(f"{tuning[0]} fine-tunes runs; the teacher's baselines have none to fine-tune: drop it")
    if "--finetune-mode" in given and ctx.params["finetune_steps"] == 0:
        raise click.UsageError("--finetune-mode sets how runs are fine-tuned, and --finetune-steps 0 fine-tunes none: "
                               "give --finetune-steps, or drop --finetune-mode")


def _seen_list(seen_classes):
    """The classes named by --seen-classes (None: not given), each once."""
    from embedcache.config import named_twice

    if seen_classes is None:
        return None
    seen = [c.strip() for c in seen_classes.split(",")]
    if not any(seen):
        raise click.UsageError(f"--seen-classes names no class ({seen_classes!r}); give them comma-separated, "
                               "e.g. --seen-classes dog,horse")
    if not all(seen):  # a class left out by mistake reads as a smaller seen set, scored without a word
        raise click.UsageError(f"--seen-classes has an empty name ({seen_classes!r}); name each seen class once, "
                               "comma-separated, with no empty entry")
    twice = named_twice(seen)
    if twice is not None:
        raise click.UsageError(f"--seen-classes names {twice!r} twice; name each seen class once")
    return seen


@main.command()
@click.argument("results", type=click.Path(exists=True))
@click.option("--out", "out_dir", help="folder for report.md, report.csv and the PNG plots (default: report/, or SWEEP_DIR/report)")
def report(results, out_dir) -> None:
    """Turn a results file, or a sweep directory, into markdown tables (methods x domains, mean ± std) and plots.

    RESULTS: a results .parquet file (`embedcache evaluate ... --out results.parquet`), or a
    sweep folder (its runs' results; a sweep still training is reported as far as it got, and said so).
    Writes report.md (a table per split: open_vocab and few_shot by mean per-class accuracy, the other
    splits by top-1; collapsed models and cells of few images said under their table), report.csv (the
    tables' numbers, one row per method, split and domain) and PNG plots (per-domain bars per split,
    and in- against out-of-domain accuracy where a lodo split was scored).
    """
    from embedcache.evaluate.report import write_report
    from embedcache.evaluate.results import read_results

    note = ""
    _require_results(results, out_dir)
    if Path(results).is_dir():
        from embedcache.students.sweep import collect, left_out_note, partial_note

        df = collect(results)
        out_dir, note = out_dir or str(Path(results) / "report"), partial_note(results, None, df)
        left_out = left_out_note(results, df)
        if left_out:
            click.echo(f"warning: {left_out}", err=True)
    else:
        df, out_dir = read_results(results), out_dir or "report"
    if note:
        click.echo(f"warning: {note}", err=True)
    for f in write_report(df, out_dir, note=note):
        click.echo(str(f))


TAKES = "report takes a results .parquet file (`embedcache evaluate ... --out results.parquet`) or a sweep folder"


def _require_results(results: str, out_dir) -> None:
    """A store, a run or another folder given to ``report``, or an --out that is a file: one line each."""
    from embedcache.store import Store

    p = Path(results)
    if out_dir and Path(out_dir).is_file():
        raise click.UsageError(f"--out {out_dir} is a file; report writes a folder (report.md and its plots): give a "
                               "folder path")
    if Store.exists(results):
        raise click.UsageError(f"{results} is a store, not results: {TAKES}; `embedcache evaluate --store {results} "
                               "--out results.parquet` scores its teacher")
    if p.is_dir() and not any((p / x).exists() for x in ("results", "runs", "runs.json")):
        raise click.UsageError(f"{results} is not a sweep folder (no results/ in it): {TAKES}")
    require_writable(out_dir if out_dir is not None else str(p / "report") if p.is_dir() else "report")


def _nothing_found(paths, found) -> str:
    """Why evaluate had nothing to score, naming where it looked (it said only "no finished run found": a trial)."""
    where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if found:
        return (f"nothing to evaluate: {len(found)} run(s) found in {where}, none finished (unfinished or failed); "
                "rerun their train command or sweep (each resumes), then evaluate again")
    return (f"nothing to evaluate: no run found in {where} (each path given is a run's folder, holding its "
            "config.json, or holds runs in its subfolders or its runs/ folder; deeper ones are not looked for)")
