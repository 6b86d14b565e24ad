"""Commands on stores: extract, inspect, verify, features, configs."""
from __future__ import annotations

import json
from typing import Optional, Sequence

import click

from embedcache.limits import SEED_MAX
from ._app import main, overrides_option


@main.command()
@click.option("--config", "config_path", help="a YAML file, or the name of a packaged config (`embedcache configs`)")
@click.option("--out", help="store path (.zarr folder, or .h5 for HDF5)")
@overrides_option("views.count=4")
@click.option("--shard", type=int, help="this worker's index (default: $RANK, else 0)")
@click.option("--num-shards", type=int, help="number of workers filling the store (default: $WORLD_SIZE, else 1)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--dry-run", is_flag=True, help="say what the extraction would encode and cost; write nothing and pay "
                                              "nothing (but, said when made, one query to learn a service's dimension)")
def extract(config_path: Optional[str], out: Optional[str], overrides: Sequence[str], shard, num_shards, no_progress,
            dry_run) -> None:
    """Run the teacher once over a dataset and write a store (resumes if interrupted, repairs if damaged).
    Without --config: the synthetic demo with the offline teacher."""
    from embedcache.config import load_extract_config
    from embedcache.extract import extract as run

    values = {"out": out, "shard": shard, "num_shards": num_shards, "progress": False if no_progress else None}
    cfg = load_extract_config(config_path or "demo", overrides, values)
    if config_path is None:
        click.echo("no --config given: extracting the demo (`embedcache configs show demo` prints its settings)")
    try:
        res = run(cfg, log=click.echo, dry_run=dry_run)
    except KeyboardInterrupt as exc:
        if dry_run and not (str(exc) and " " in str(exc)):  # nothing to resume: a dry run writes and pays nothing
            raise KeyboardInterrupt("stopped: a dry run writes nothing; rerun it for its figures") from None
        raise
    if dry_run:
        if res.complete:
            click.echo(f"dry run for {res.path}: the store is complete: nothing to encode or pay for "
                       "(`embedcache verify` checks it)")
            return
        click.echo(f"dry run for {res.path}: {res.rows:,} images x {res.views_per_image} views = {res.views:,} views to encode")
        if res.writing:
            click.echo("  another extraction is writing this store now: these are what it has not finished yet, its "
                       "requests in flight among them")
        for line in _cost_lines(res.cost, res.writing, res.shards) + _budget_lines(res) + _quota_lines(res):
            click.echo(f"  {line}")
        return
    if not res.skipped and res.images:  # none: a call that only finished the prompts and tables
        rate = res.images / res.seconds if res.seconds > 0 else 0.0
        click.echo(f"{res.images} images read in {res.seconds:.1f}s ({rate:.1f} images/s, start-up included)")


def _budget_lines(res) -> list:
    """A dry run's paid queries against teacher.max_queries (the store's budget, over every call)."""
    if res.budget is None:
        return []
    from embedcache.teachers.remote.teacher import queries_in, replay_note

    (limit, sent), need = res.budget, queries_in(res.cost)
    said = (f"budget: this extraction needs {need:,} more queries{replay_note(res.cost)} and this store has sent {sent:,} of "
            f"teacher.max_queries={limit:,}: ")
    if res.shards > 1:
        return [said.replace("this extraction", "this shard") + f"the other {res.shards - 1} shard(s)' queries are not "
                "counted here; a dry run with --num-shards 1 prices the whole store"]
    if need == 0 or sent + need <= limit:  # nothing to send claims nothing: it finishes
        return [said + f"within it ({max(0, limit - sent - need):,} to spare)"]
    return [said + f"it would stop before finishing; rerun with teacher.max_queries >= {sent + need:,} to finish"]


def _quota_lines(res) -> list:
    """A dry run's paid queries against the quota the service keeps for this key (where it says it)."""
    if res.quota is None:
        return []
    from embedcache.teachers.remote.teacher import queries_in

    (used, quota), need = res.quota, queries_in(res.cost)
    said = f"the service's quota for this key: {used:,} of {quota:,} queries used; this extraction needs {need:,}: "
    if used + need <= quota:
        return [said + f"within it ({quota - used - need:,} to spare)"]
    return [said + f"it would stop when the quota is spent, at most {quota - used:,} queries in (a request that would "
                   "pass it is refused whole); have the service raise it (or rerun once it renews) to finish"]


def _cost_lines(cost, writing: bool = False, shards: int = 1) -> list:
    """A dry run's cost in words: per modality, what is sent, what the ledger answers free, in how
    many requests as extraction batches them, and in how many at the service's own batch limit.
    ``writing``: an extraction writes the store now (its requests in flight are not a stopped call's).
    ``shards``: the store's; its prompts are encoded once, by the shard that finishes it, and each shard's
    dry run counts them (summed over the shards they were counted that many times, a trial)."""
    if not cost:
        return ["no paid queries (a local teacher)"]
    lines = []
    if cost.get("probe_queries"):
        lines.append(f"paid now: {cost['probe_queries']} query to learn the service's embedding dimension (kept in the "
                     "ledger; teacher.dimensions skips it)")
    for unit, p in (("views", ""), ("prompts", "text_")):
        sent = cost.get(f"{p}images" if not p else f"{p}texts", 0)
        if not sent and not cost.get(f"{p}ledger_hits"):
            continue
        limit = cost.get(f"{p}batch_limit") or 0
        at_limit = f", {cost.get(f'{p}requests_at_batch_limit', 0):,} if batched at the service's limit of {limit:,}" if limit else ""
        repeats = cost.get(f"{p}duplicates", 0)
        once = f" ({repeats:,} repeats of an input counted already, each paid once)" if repeats else ""
        replay = cost.get(f"{p}replayable", 0)
        sender = "a running or stopped call" if writing else "a stopped call"
        again = (f" ({replay:,} of them in requests {sender} sent, which the service answers again free under "
                 "their idempotency keys if it charged them, while it keeps them)") if replay else ""
        apart, keyless = cost.get(f"{p}resent_apart", 0), cost.get(f"{p}resent_without_key", 0)
        again += (f" ({apart:,} of them in requests a stopped call sent, going out now in other requests (was batch_size "
                  "changed?): paid twice if the service charged them then; the batch size the store began with replays "
                  "them free)") if apart else ""
        again += (f" ({keyless:,} of them in requests a stopped call sent, going out again to a service that takes no "
                  "idempotency key: paid twice if it charged them then)") if keyless else ""
        whole = (f"; once for the whole store, by the shard that finishes it: count them once over the {shards} "
                 "shards' dry runs") if p and shards > 1 else ""
        lines.append(f"{unit}: {sent:,} to pay for{again} ({cost.get(f'{p}bytes', 0):,} bytes), {cost.get(f'{p}ledger_hits', 0):,} "
                     f"answered free by the ledger{once}; {cost.get(f'{p}requests', 0):,} requests as extraction sends "
                     f"them{at_limit}{whole}")
    return lines


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON data (counts, the calls and a paid "
              "teacher's usage as the manifest records them)")
def inspect(store: str, as_json: bool) -> None:
    """Summarise a store: teacher, images, views, domains, classes, failures, disk size (and how far
    an unfinished one got)."""
    from embedcache.api import StoreReader
    from embedcache.store import Store

    with Store(store) as st:
        reader = StoreReader(st, require_complete=False)
        if as_json:
            click.echo(json.dumps(reader.facts(), indent=2))
            return
        summary = reader.summary()
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.argument("store")
@click.option("--repair", is_flag=True, help="re-do the damaged blocks and files (runs the store's own extraction again)")
@overrides_option("dataset.path=/path/to/pacs (with --repair: where the images are now)")
@click.option("--no-progress", is_flag=True)
def verify(store: str, repair: bool, overrides: Sequence[str], no_progress: bool) -> None:
    """Check every block and table of a store against the checksums written with it."""
    from embedcache.extract.verify import verify_store

    if overrides and not repair:
        raise click.UsageError("--set changes the extraction a repair runs; give it with --repair")
    res = verify_store(store, repair, overrides, progress=not no_progress, log=click.echo)
    if res.repaired is not None:  # what was re-done: a rewritten table alone read as "0 block(s) re-done" (a trial)
        files = sorted(res.report.files)
        written = f", {len(files)} file(s) written again ({', '.join(files)})" if files else ""
        remade = f", {len(res.remade)} prompt array(s) encoded again" if res.remade else ""
        click.echo(f"{store}: repaired ({res.repaired} block(s) re-done{written}{remade})")
    elif res.report.ok and not res.report.derived:
        unfinished = f"; {res.unfinished}" if res.unfinished else ""
        files = f" and {res.files_checked} files" if res.files_checked or not res.unfinished else ""  # none before the finish
        click.echo(f"{store}: {res.report.blocks_checked} blocks{files} intact{unfinished}")


@main.command()
@click.option("--store", required=True, help="store to add the features to")
@click.option("--student", required=True, help="student backbone name")
@overrides_option("input_size=64")
@click.option("--seed", "seeds", type=click.IntRange(0, SEED_MAX), multiple=True, default=(0,), show_default=True,
              help="seed the backbone is built under (repeatable: each seed's backbone, one after another)")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def features(store, student, overrides, seeds, batch_size, device, no_progress) -> None:
    """Cache frozen student-backbone features per view in a store, for head-only training
    (--set pretrained=/path --set input_size=160 ...: student settings)."""
    from embedcache.config import apply_overrides, build_config
    from embedcache.students.features import cache_features
    from embedcache.students.models import StudentConfig

    # `student.input_size=64` as train spells it, or `input_size=64`
    as_given = list(overrides)
    overrides = [o[len("student."):] if o.startswith("student.") else o for o in overrides]
    given = apply_overrides({}, overrides)
    if "name" in given and given["name"] != student:  # --student won without a word (a review)
        typed = [a for a, o in zip(as_given, overrides) if o.split("=", 1)[0].strip() == "name"]  # as typed
        named = typed[-1] if typed else f"name={given['name']}"  # (a nested name.x=... sets it as a mapping)
        raise click.UsageError(f"--student {student} and --set {named} name two students; give --student alone")
    cfg = build_config(StudentConfig, {**given, "name": student}, prefix="student.")
    try:
        for seed in dict.fromkeys(seeds):
            cache_features(store, cfg, seed=seed, batch_size=batch_size, device=device, progress=not no_progress,
                           log=click.echo)
    except KeyboardInterrupt as exc:
        if not (str(exc) and " " in str(exc)):  # nothing kept to resume from: the array is written whole
            raise KeyboardInterrupt("stopped: features are written whole once every batch is done, so nothing was "
                                    "kept (backbones already cached stay); rerun the same command to compute the "
                                    "rest from the start") from None
        raise


@main.group(invoke_without_command=True)
@click.pass_context
def configs(ctx) -> None:
    """List the configs shipped with the package, per command (`configs show NAME` prints one)."""
    if ctx.invoked_subcommand is not None:
        return
    from embedcache.config import KINDS, packaged_configs

    for kind in KINDS:
        found = packaged_configs(kind)
        if found:
            click.echo(f"{kind} (embedcache {kind} {'NAME' if kind == 'sweep' else '--config NAME'}):")
            width = max(len(n) for n in found)
            for name, doc in found.items():
                click.echo(f"  {name:<{width}}  {doc}")


@configs.command("show")
@click.argument("name", nargs=-1, required=True)
@click.option("--kind", type=click.Choice(["extract", "train", "sweep", "synthesize", "serve"]),
              help="which command's config (default: the first with that name)")
def configs_show(name: Sequence[str], kind: Optional[str]) -> None:
    """Print a packaged config, to copy and edit: `configs show NAME`, or `configs show KIND NAME`."""
    from embedcache.config import KINDS, config_text, packaged_configs
    from embedcache.errors import ConfigError

    if len(name) == 2 and name[0] in KINDS and kind in (None, name[0]):  # `configs show train demo`
        kind, name = name[0], name[1:]
    if len(name) != 1:
        raise click.UsageError(f"configs show takes NAME or KIND NAME (KIND one of {', '.join(KINDS)}), not "
                               f"{' '.join(name)}")
    name = name[0]

    kinds = [k for k in ([kind] if kind else KINDS) if name in packaged_configs(k)]
    if kinds:
        if len(kinds) > 1:  # on stderr: stdout stays the file to copy
            click.echo(f"# the {kinds[0]} config {name}; there is also a {', '.join(kinds[1:])} config of that name "
                       f"(`configs show KIND {name}` to choose)", err=True)
        click.echo(config_text(kinds[0], name)[0], nl=False)
        return
    raise ConfigError(f"no packaged config named {name!r}; `embedcache configs` lists them")
