"""Reports from a results file: markdown tables (methods x domains, mean ± std over seeds) and plots."""
from __future__ import annotations

import re
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import pandas as pd

from .results import NOT_ONE_DOMAIN
from .store_eval import Tables, avg_said, class_split_note, method_frame, method_keys, per_class_table, transferred


# The splits of class-held-out protocols, reported as Li et al. report them: mean per-class accuracy
# (on imbalanced datasets it differs from top-1). Every other split's headline is top-1. Fine-tuning's
# splits carry their steps ("finetune@50"): the name before the "@" counts.
PER_CLASS_HEADLINE = ("unseen_zero_shot", "gzsl_seen", "gzsl_unseen", "gzsl_harmonic", "prototype", "tip_adapter",
                      "li_retrieval", "text_only", "finetune", "finetune_mixed")


def transfer_note(results: pd.DataFrame) -> str:
    """A line said above the tables of results that hold --transfer rows ('' for none): without it a table of them
    read as the runs' own scores (beside the teacher's zero_shot rows of the same store)."""
    if not transferred(method_frame(results)).any():
        return ""
    return ("Rows whose `trained_on` is not the store scored (`store_key`) are --transfer scores: runs trained on "
            "another store (synthesised images, another dataset) scored on this one, every image of it unseen by them.")


def headline_metric(split: str) -> str:
    return "mean_per_class" if split.split("@")[0] in PER_CLASS_HEADLINE else "top1"


def markdown(table: pd.DataFrame) -> str:
    """A pivot table as a GitHub markdown table (no extra dependency)."""
    idx_names = [n or "" for n in table.index.names]
    head = idx_names + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in table.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        lines.append("| " + " | ".join([str(i) for i in idx] + ["" if pd.isna(v) else str(v) for v in row]) + " |")
    return "\n".join(lines)


def _method(df: pd.DataFrame, keys: List[str]) -> pd.Series:
    """A plot's label of each row's method: recipe / student, then whatever else tells methods apart
    in this file (store, text source, variant), so a bar or point never averages two methods."""
    label = df["recipe"] + " / " + df["student"]
    for k in keys:
        if k not in ("recipe", "student") and df[k].nunique() > 1:
            label = label + " / " + (df[k].str[:8] if k == "store_key" else
                                     "trained on " + df[k].str[:8] if k == "trained_on" else df[k].astype(str))
    return label


def table_notes(results: pd.DataFrame, split: str) -> List[str]:
    """The lines report.md says under ``split``'s table (``_collapse_lines``, ``few_image_lines``), for a
    printed table of results as scored (notes the report alone gave)."""
    results = method_frame(results)
    return [line for line in _notes(results, split, method_keys(results)) if line]


def _notes(results: pd.DataFrame, split: str, keys: List[str]) -> List[str]:
    return _collapse_lines(results, split, keys) + few_image_lines(results, split, keys)


FEW_IMAGES = 10  # a method's cell resting on fewer images than this in every run is said under its table


def few_image_lines(results: pd.DataFrame, split: str, keys: List[str]) -> List[str]:
    """The domains of ``split`` where a method's cell rests on fewer than FEW_IMAGES images in every one of its
    runs that says how many (``results`` from ``method_frame``, ``keys`` its methods'): one image's answer moves
    such a cell by 1/n (a domain of one image reads 0 or 100%), and a table's avg weighs it as much as any other
    domain (a one-image domain was a third of the teacher's avg: a trial). Each method's cells apart: another
    method's, or another store's, larger count of one domain hides nothing."""
    here = results[(results["split"] == split) & (results["episode"] == -1) & (results["metric"] == "top1")
                   & ~results["domain"].isin([*NOT_ONE_DOMAIN, "avg"]) & (results["n"] > 0)]  # n = 0: no count
    cells = here.assign(method=_method(here, keys)).groupby(keys + ["domain"]).agg(n=("n", "max"), method=("method", "first"))
    few = cells[cells["n"] < FEW_IMAGES].reset_index()  # a cell: its largest run
    if few.empty:
        return []
    said = []
    for domain, g in few.groupby("domain", sort=True):
        g = g.sort_values(["n", "method"])
        more = f" and {len(g) - 1} more method(s)" if len(g) > 1 else ""
        said.append(f"{domain} ({int(g['n'].iloc[0])} image{'' if g['n'].iloc[0] == 1 else 's'}: "
                    f"{g['method'].iloc[0]}{more})")
    return [f"few images: {', '.join(said)}, per run at most in the cell; one image's answer moves such a cell by 1/n, "
            "and the avg weighs it as much as any other domain", ""]


def _collapse_lines(results: pd.DataFrame, split: str, keys: List[str]) -> List[str]:
    """The cells of ``split`` where a model answered one class for nearly every image (evaluate's
    ``collapsed_share`` rows): said under the table, whose figure there is only that class's share."""
    here = results[results["split"] == split]
    here = here.assign(method=_method(here, keys))  # one label per method: told apart over the split's rows
    lines = []
    for episodes, said_as in ((False, "collapsed"), (True, "collapsed episodes")):  # a run's; one few-shot episode's
        rows = here[(here["episode"] >= 0) == episodes]
        hit = rows[rows["metric"] == "collapsed_share"]
        if hit.empty:
            continue
        top = rows[rows["metric"] == "top1"]
        count = len if episodes else ((lambda g: g["run"].nunique()) if "run" in here.columns else len)
        unit = "episodes" if episodes else "runs"
        said = []
        for (method, domain), g in hit.groupby(["method", "domain"], sort=True):
            of = count(top[(top["method"] == method) & (top["domain"] == domain)])
            classes = sorted(set(g["class_name"].astype(str)))
            names = repr(classes[0]) if len(classes) == 1 else (  # runs collapsed onto different classes: each one
                "one class (" + " or ".join(repr(c) for c in classes) + f", by {unit[:-1]})")  # ('circle', 'square' read as both)
            share = f"{g['value'].mean():.0%}" if len(g) == 1 or g["value"].nunique() == 1 else (
                f"{g['value'].min():.0%} to {g['value'].max():.0%}")
            where = "over its domains pooled" if domain == "avg" else f"on {domain}"  # not the table's avg cell (a trial)
            said.append(f"{method} {where} answers {names} for {share} of the images in {count(g)} of its {of} {unit}")
        lines += [f"{said_as}: " + "; ".join(said) + " (its top-1 there is that class's share)", ""]
    return lines


def id_vs_ood(tables: Tables) -> pd.DataFrame:
    """Methods x (in_domain, out_of_domain) average top-1: the tables' ``avg`` cells (their replicates and
    rules: a mean of every run's own avg had put points off the table's numbers), of the methods with one
    on both sides (the teacher's zero_shot rows, a run scored on one side only, have no point)."""
    sides = [tables.avg_stats(split).assign(split=split) for split in ("in_domain", "out_of_domain")]
    t1 = pd.concat([a for a in sides if len(a)], ignore_index=True) if any(len(a) for a in sides) else None
    if t1 is None:
        return pd.DataFrame(columns=["in_domain", "out_of_domain"])
    t1 = t1.assign(method=_method(t1, tables.keys))
    fewer = set(t1.loc[t1["spans"].notna(), "method"]) if "spans" in t1.columns else set()
    m = t1.pivot_table(index="method", columns="split", values="mean", aggfunc="first")
    # an avg the table says is over fewer of its domains is marked, not ranked among the others unmarked (a trial)
    m = m.rename(index=lambda name: f"{name} (avg over fewer domains)" if name in fewer else name)
    return m.reindex(columns=["in_domain", "out_of_domain"]).dropna()


def label_lines(points: Sequence[Tuple[float, float]], near_x: float, near_y: float) -> List[int]:
    """The line, below its point, of each point's label: the first line no label of an earlier point
    within ``near_x`` and ``near_y`` of it took, so methods at one point (or close) have their names one
    under another, not printed over each other."""
    lines: List[int] = []
    for i, (x, y) in enumerate(points):
        taken = {lines[j] for j, (a, b) in enumerate(points[:i]) if abs(a - x) <= near_x and abs(b - y) <= near_y}
        lines.append(next(k for k in range(len(points)) if k not in taken))
    return lines


def write_report(results: pd.DataFrame, out_dir: str, note: str = "") -> List[Path]:
    """report.md with one table per split, and PNG plots: per-domain bars per split, and in-domain
    vs out-of-domain accuracy per method when both exist. ``note``: a line said first (a partial sweep)."""
    import matplotlib
    matplotlib.use("Agg")

    with _plot_fonts():
        return _write_report(results, out_dir, note)


# fonts with the glyphs DejaVu Sans lacks (CJK scripts, symbols), used where installed: matplotlib falls back
# along the family list glyph by glyph
FALLBACK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
                  "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "Noto Sans Symbols 2", "Symbola")
MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


@contextmanager
def _plot_fonts() -> Iterator[None]:
    """Plots whose labels (domains, methods) are in any script: DejaVu Sans, then the FALLBACK_FONTS this
    machine has; the characters no installed font draws are said in one line naming the fix (matplotlib
    said each glyph of each plot: 15 lines for two CJK domain names, a trial). Every other warning is
    shown as it comes, as it would be without this."""
    import matplotlib
    from matplotlib import font_manager

    have = {f.name for f in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans"] + [f for f in FALLBACK_FONTS if f in have]
    if threading.current_thread() is not threading.main_thread():  # the warnings module's state is the process's:
        with matplotlib.rc_context({"font.family": families}):  # reports written in threads at once left the
            yield                                               # wrapper installed (a review); each glyph said there
        return
    missing = set()
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("always", message=MISSING_GLYPH.pattern)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            glyph = MISSING_GLYPH.match(str(message))
            if glyph:
                missing.add(chr(int(glyph.group(1))))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show  # (catch_warnings puts the caller's back)
        yield
    if missing:
        said = " ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
        warnings.warn(f"report plots: {len(missing)} character(s) of their labels ({said}) are in no installed font "
                      "and show as boxes; report.md and report.csv have them as written (a font that has them, e.g. "
                      "the fonts-noto-cjk package, draws them)", stacklevel=4)  # at write_report's caller


def _write_report(results: pd.DataFrame, out_dir: str, note: str) -> List[Path]:
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = Tables(results)
    results, keys = tables.results, tables.keys  # rows of other variants, class splits or stores are never averaged together
    parts, files = ["# Results\n"] + ([f"**{note}**\n"] if note else []), []
    parts += [f"{line}\n" for line in (transfer_note(results), class_split_note(results)) if line]
    if "per_class" in set(results["split"]):
        parts += ["## per class (top-1, %, mean over replicates of each replicate's mean over its held-out splits, "
                  "complete replicates only where a method has any; `domain`: the scope scored, out_of_domain, "
                  "in_domain, unseen_zero_shot, zero_shot (the seen classes of a --transfer run that held classes out), or "
                  "all (the teacher, and --transfer rows of runs that held none out))\n", markdown(per_class_table(results)), ""]
    dist = results[results["split"].isin(["distill", "text"])]
    if not dist.empty:
        tab = dist.pivot_table(index=keys, columns="metric", values="value", aggfunc="mean").round(3)
        parts += ["## distillation metrics (mean over runs: seeds and held-out splits; higher is better, but for "
                  "m_vlalign, the share of the teacher's top-k label pairs the student ranks inverted, and "
                  "text_pairwise_cosine, between class texts, where lower is)\n", markdown(tab), ""]
    for split in table_splits(results):
        metric = table_metric(results, split)
        shown = "mean per-class accuracy" if metric == "mean_per_class" else "top-1"
        table = tables.summary_table(split, metric)
        parts += [f"## {split} ({shown}, %; mean ± sample std (ddof 1) over replicates{avg_said(table)})\n",
                  markdown(table), ""] + _notes(results, split, keys)
        top = tables.domain_stats(split, metric)  # the table's numbers: its replicates, mean and spread
        if top.empty:
            continue
        top = top.assign(method=_method(top, keys))
        pv = top.pivot_table(index="domain", columns="method", values="mean", aggfunc="first")
        spread = top.pivot_table(index="domain", columns="method", values="std", aggfunc="first", dropna=False)
        # one replicate, or no cell: no error bar (a cap at 0 read as a measured 0% or a spread of 0: a trial)
        spread = spread.reindex(index=pv.index, columns=pv.columns)
        ax = (100 * pv).plot.bar(figsize=(max(6, 1.2 * len(pv)), 4), rot=0, yerr=100 * spread, capsize=2)
        ax.set_ylabel(f"{shown} (%)"); ax.set_title(f"{split}: mean ± std over replicates"); ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)  # an accuracy: an error bar past 0 drew a negative axis (and a 0 looked like a dip)
        plt.tight_layout()
        f = out / f"{split}_domains.png"
        plt.savefig(f, dpi=110); plt.close()
        files.append(f)
    m = id_vs_ood(tables)
    if len(m):
        fig, ax = plt.subplots(figsize=(6, 5))
        xs, ys = (100 * m["in_domain"]).tolist(), (100 * m["out_of_domain"]).tolist()
        ax.scatter(xs, ys)
        span_x, span_y = max(max(xs) - min(xs), 1.0), max(max(ys) - min(ys), 1.0)  # labels near in the plot's scale
        lines = label_lines(list(zip(xs, ys)), 0.25 * span_x, 0.04 * span_y)
        middle = (max(xs) + min(xs)) / 2
        for name, x, y, line in zip(m.index, xs, ys, lines):  # names of points right of the middle to their left:
            right = x > middle  # a long name ran off the figure's right edge (a trial)
            ax.annotate(name, (x, y), xytext=(-3 if right else 3, -9 * line), textcoords="offset points", fontsize=7,
                        ha="right" if right else "left")
        ax.margins(x=0.35, y=0.1)  # room for the labels of the outermost points
        ax.set_xlabel("in-domain top-1 (%)"); ax.set_ylabel("out-of-domain top-1 (%)")
        ax.set_title("each method's avg: the tables' avg cells", fontsize=9)
        plt.tight_layout()
        f = out / "id_vs_ood.png"
        plt.savefig(f, dpi=110); plt.close()
        files.append(f)
    tidy_tables(tables).to_csv(out / "report.csv", index=False)
    (out / "report.md").write_text("\n".join(parts) + "\n" + "\n".join(f"![{f.stem}]({f.name})" for f in files) + "\n")
    return [out / "report.md", out / "report.csv"] + files


SPECIAL = {"per_class", "distill", "text"}  # splits report.md tables otherwise: not methods x domains


def table_splits(results: pd.DataFrame) -> List[str]:
    """The splits report.md tables as methods x domains."""
    return sorted(set(results["split"].unique()) - SPECIAL)


def table_metric(results: pd.DataFrame, split: str) -> str:
    """The metric a split's table shows: its headline metric, or top-1 for results without it (made by hand)."""
    metric = headline_metric(split)
    return metric if ((results["split"] == split) & (results["metric"] == metric)).any() else "top1"


def tidy_tables(tables: Tables) -> pd.DataFrame:
    """report.csv: the numbers of report.md's methods x domains tables, one row per method, split and
    domain (``avg``: the avg cell), as fractions: mean, sample std (ddof 1) and count over the replicates
    that count, and ``cell``, the table's text of it (a blank for a domain cell: the table's own
    rounding; an avg over fewer domains says so there)."""
    keys, results = tables.keys, tables.results
    frames = []
    for split in table_splits(results):
        metric = table_metric(results, split)
        cells = pd.concat([tables.domain_stats(split, metric),
                           tables.avg_stats(split, metric).assign(domain="avg")], ignore_index=True)
        frames.append(cells.assign(metric=metric))
    columns = keys + ["split", "metric", "domain", "mean", "std", "count", "cell"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True).reindex(columns=columns).astype({"count": int})
