"""A sweep's results tables: the rows of its current grid's runs (``collect``), the notes saying what a
table leaves out (runs unscored, dropped from the grid, scored into the folder's file by hand), and the
folder's results.parquet and report, written by the launch whose grid is the folder's."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pandas as pd

from embedcache.errors import ConfigError, EvaluationError
from embedcache.evaluate.results import merge, read_results
from embedcache.fileio import atomic_write, read_json

from ..rundir import RunDir
from ..identity import digest_of_settings
from .worker import SweepPoint, result_path

RUNS_EVER = "runs_ever.json"  # every run name any launch's grid held: a sweep run's, whatever was deleted since
REWRITTEN = "delete it: the sweep's next launch writes it again"  # runs.json, runs_ever.json, tags.json


def collect(sweep_dir: str, names: Optional[List[str]] = None) -> pd.DataFrame:
    """The result rows of the runs ``names``, by default the sweep's current grid (``runs.json``,
    written at each launch): runs of grid values since dropped stay on disk but out of its table.
    Each run's variant and replicate are those of the current grid (``tags.json``): a run scored
    under an earlier grid (before a base value moved into the grid) is one method with its peers."""
    files = sorted((Path(sweep_dir) / "results").glob("*.parquet"))
    names = grid_runs(sweep_dir) if names is None else names
    if names is not None:
        current = set(names)
        files = [f for f in files if f.stem in current]
    if not files:
        raise ConfigError(f"no results in {sweep_dir}/results yet; run the sweep first")
    df = pd.concat([_run_results(f) for f in files], ignore_index=True)
    folder = _folder_rows(sweep_dir)
    if folder is not None:  # rows scored into the folder's file: the teacher's, and the runs' other protocols
        foreign = folder[~folder["run"].isin(_sweep_runs(sweep_dir, names))]
        df = merge(pd.concat([foreign, folder[folder["run"].isin(set(df["run"]))]], ignore_index=True), df)
    tags = _tags(sweep_dir)
    for col in ("variant", "replicate"):
        df[col] = [tags.get(r, {}).get(col, v) for r, v in zip(df["run"], df[col])]
    return _settings_with_weights(sweep_dir, df)


def _settings_with_weights(sweep_dir: str, df: pd.DataFrame) -> pd.DataFrame:
    """Rows of runs from a student.pretrained file, scored before runs recorded its hash, carry a settings digest
    without it, and runs scored since carry it: their ``settings`` as scoring gives it now, so that one file's
    runs stay one method (a review: a third seed added by a relaunch was a method of its own)."""
    from ..scoring import run_settings

    for name in df["run"].unique():
        run = RunDir(Path(sweep_dir) / "runs" / name)
        config = run.config if run.file("config.json").is_file() else {}
        if config and "student_weights" not in config and (config.get("student") or {}).get("pretrained"):
            df.loc[df["run"] == name, "settings"] = digest_of_settings(run_settings(run))
    return df


def _folder_rows(sweep_dir: str) -> Optional[pd.DataFrame]:
    """The rows of the folder's results.parquet (the last table written, and rows scored into it with
    ``evaluate --out``), or None when it has none."""
    path = Path(sweep_dir) / "results.parquet"
    if not path.is_file():
        return None
    try:
        return read_results(str(path))
    except EvaluationError:
        raise EvaluationError(f"{path} is damaged (not a readable results file); delete it (rows scored into it by "
                              "hand go with it): the sweep's runs' rows are in results/, and its next launch writes it again") from None


def read_listed(sweep_dir: str, name: str) -> List[str]:
    path = Path(sweep_dir) / name
    fix = (REWRITTEN + " (from the current grid alone: runs of earlier grids with results then go unsaid under its "
           "tables)") if name == RUNS_EVER else REWRITTEN
    return read_json(path, list, fix) if path.is_file() else []


def _sweep_runs(sweep_dir: str, names: Optional[List[str]]) -> set:
    """Every run name of the sweep: of any launch's grid, of its run folders and of its results files
    (runs of grids since dropped included, their folders deleted or not): their rows come from their
    results/ files, or not at all."""
    d = Path(sweep_dir)
    found = {p.name for p in (d / "runs").glob("*") if p.is_dir()} | {p.stem for p in (d / "results").glob("*.parquet")}
    return found | set(names or []) | set(grid_runs(sweep_dir) or []) | set(read_listed(sweep_dir, RUNS_EVER))


def left_out_note(sweep_dir: str, table: pd.DataFrame) -> str:
    """'' unless the folder's results.parquet holds rows of runs of the sweep that ``table`` (``collect``'s)
    has none of: runs without results now (failed or unfinished since they were scored into it), whose
    rows a table leaves out and a launch's rewrite of the file drops."""
    folder = _folder_rows(sweep_dir)
    if folder is None:
        return ""
    grid = set(grid_runs(sweep_dir) or table["run"])
    gone = folder[folder["run"].isin(grid - set(table["run"]))]
    if gone.empty:
        return ""
    runs = sorted(gone["run"].unique())
    return (f"{Path(sweep_dir) / 'results.parquet'} holds {len(gone)} row{'s' if len(gone) != 1 else ''} of run"
            f"{'s' if len(runs) != 1 else ''} {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}, which "
            f"{'have' if len(runs) != 1 else 'has'} no results now (failed or unfinished): left out of this table, "
            "and a launch rewrites that file without them")


def grid_runs(sweep_dir: str) -> Optional[List[str]]:
    """The run names of the sweep's current grid (None for a sweep launched before runs.json)."""
    listed = Path(sweep_dir) / "runs.json"
    return read_json(listed, list, REWRITTEN) if listed.is_file() else None


def unscored(sweep_dir: str, names: Optional[List[str]] = None) -> List[str]:
    """The runs of the sweep's current grid (or ``names``) without results: failed, unfinished, or
    running elsewhere. A table without them is partial."""
    names = grid_runs(sweep_dir) if names is None else names
    return sorted(n for n in names or [] if not result_path(sweep_dir, n).exists())


def partial_note(sweep_dir: str, names: Optional[List[str]] = None, results: Optional[pd.DataFrame] = None) -> str:
    """'' for a sweep whose every run has results; else a line saying the tables are partial. With
    ``results`` (the table said), the runs it holds, not those with results now: another launch sharing
    the folder may have scored more since it was collected (a trial: a partial table said without it)."""
    listed = grid_runs(sweep_dir) if names is None else names
    names = listed or []
    missing = unscored(sweep_dir, names) if results is None else sorted(set(names) - set(results["run"]))
    outside = _scored_outside(sweep_dir, names + (grid_runs(sweep_dir) or [])) if listed is not None else []
    total = len(names)
    if not missing:
        return outside_note(sweep_dir, outside)
    note = (f"partial: {total - len(missing)} of {total} runs of this sweep have results ({len(missing)} failed, "
            "unfinished or running elsewhere); cells and averages below are over a method's complete replicates where "
            "it has any, else over the runs that have them (the replicates column says which)")
    absent = _methods_without_results(sweep_dir, names, set(missing))
    if absent:
        note += "; " + "; ".join(f"no run of {m} has results: it is not in the tables" for m in absent)
    unheld = _held_out_without_results(sweep_dir, names, set(missing))
    if unheld:
        note += "; " + "; ".join(f"no run holding out {d} has results: the tables have no {d} column, and their avg "
                                 "is over the other held-out domains" for d in unheld)
    return "; ".join(filter(None, (note, outside_note(sweep_dir, outside))))


def _scored_outside(sweep_dir: str, names: List[str]) -> List[str]:
    """Runs of the folder with results that the sweep's grid no longer lists (a value taken out of it)."""
    return sorted(set(p.stem for p in (Path(sweep_dir) / "results").glob("*.parquet")) - set(names))


def outside_note(sweep_dir: str, outside: List[str]) -> str:
    """'' or a line saying that runs of grid points the sweep no longer lists keep their results, outside the tables:
    a grid trimmed between launches dropped them from the table without a word (a trial)."""
    if not outside:
        return ""
    return (f"{len(outside)} run(s) of {sweep_dir} with results are of grid points this sweep no longer lists, so "
            f"they are not in these tables (`embedcache evaluate {Path(sweep_dir) / 'runs'}` scores every run)")


def _tags(sweep_dir: str) -> Dict[str, Dict]:
    listed = Path(sweep_dir) / "tags.json"
    return read_json(listed, dict, REWRITTEN) if listed.is_file() else {}


def _held_out_without_results(sweep_dir: str, names: List[str], missing: set) -> List[str]:
    """The domains the grid holds out (tags.json) that no run with results held out: a table has no
    column for them, and its avg leaves them out (each method alike, so none reads incomplete)."""
    tags = _tags(sweep_dir)
    if not all("held" in tags.get(n, {}) for n in names):  # a launch from before tags.json said them
        return []
    held = {n: set(tags[n]["held"]) for n in names}
    return sorted(set().union(*(held[n] for n in missing)) - set().union(*(held[n] for n in names if n not in missing)))


def _methods_without_results(sweep_dir: str, names: List[str], missing: set) -> List[str]:
    """The grid points (recipe / student / variant, from tags.json) none of whose runs has results: a
    table leaves them out whole, where a method short of some runs reads incomplete."""
    tags = _tags(sweep_dir)
    if not all("recipe" in tags.get(n, {}) for n in names):  # a launch from before tags.json named them
        return []

    def method(n: str) -> str:
        t = tags[n]
        return " / ".join([t["recipe"], t["student"]] + ([t["variant"]] if t["variant"] != "-" else []))

    scored = {method(n) for n in names if n not in missing}
    return sorted({method(n) for n in missing} - scored)


def _run_results(path: Path) -> pd.DataFrame:
    """One run's result rows; a damaged file is one line saying how to have the run scored again."""
    try:
        return read_results(path)
    except EvaluationError:
        raise EvaluationError(f"{path} is damaged (not readable as parquet); delete it and relaunch the sweep: "
                              "it scores that run again (its trained weights are kept)") from None


def write_outputs(sweep_dir: str, points: List[SweepPoint],
                   log: Callable[[str], None] = print) -> Tuple[Optional[pd.DataFrame], bool]:
    """This launch's table (its own grid's runs), and whether it was written as the folder's results.parquet
    and report: only while its grid is still the folder's (runs.json): a later launch with another grid owns them."""
    from embedcache.evaluate.report import write_report

    names = [Path(p.cfg.out).name for p in points]
    if not any(result_path(sweep_dir, n).exists() for n in names):
        return None, False
    results = collect(sweep_dir, names)  # this launch's grid (another launch may have rewritten runs.json)
    if not _owns_outputs(sweep_dir, names):
        log(f"note: a later launch into {sweep_dir} changed its grid, so its results.parquet and report/ are that "
            f"launch's; this launch's table is below (`embedcache report {sweep_dir}` writes the current grid's)")
        return results, False
    dropped = left_out_note(sweep_dir, results)
    if dropped:
        log(f"warning: {dropped}")
    atomic_write(Path(sweep_dir) / "results.parquet", lambda tmp: results.to_parquet(tmp, index=False))
    write_report(results, str(Path(sweep_dir) / "report"), note=partial_note(sweep_dir, names, results))
    return results, True


def _owns_outputs(sweep_dir: str, names: List[str]) -> bool:
    """Whether this launch's grid (its runs' ``names``) is still the folder's (runs.json), whose results.parquet
    and report it writes."""
    return sorted(grid_runs(sweep_dir) or names) == sorted(names)
