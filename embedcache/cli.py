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


if __name__ == "__main__":
    main()
