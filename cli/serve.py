"""``embedcache serve``: one registered teacher behind an HTTP embedding service."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import click

from ._app import LIBRARIES, import_whole, main, overrides_option


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", help="a YAML file, or the name of a packaged serve config (default: demo)")
@overrides_option("port=8001")
@click.option("--host", help="address to listen on (default from the config: 127.0.0.1)")
@click.option("--port", type=int, help="port (0: any free port)")
@click.pass_context
def serve(ctx, config_path: Optional[str], overrides: Sequence[str], host: Optional[str], port: Optional[int]) -> None:
    """Serve a teacher's embeddings over HTTP: API keys (hashed), quotas, rate limits, a ledger of
    charges and idempotent retries. Keys come from $EMBEDCACHE_SERVE_KEYS or keys_file."""
    if ctx.invoked_subcommand is not None:
        return
    import_whole(LIBRARIES)  # a group, not a ``Command``: its libraries imported whole here
    from embedcache.config import load_config
    from embedcache.serve import ServeConfig, serve as run

    cfg = load_config(ServeConfig, config_path or "demo", overrides, "serve", {"host": host, "port": port})
    run(cfg, log=click.echo)


@serve.command("hash-key", context_settings={"ignore_unknown_options": True})  # a key '--abc' is not echoed
@click.option("--name", default="NAME", show_default=True, help="the key holder's name in the keys file")
@click.argument("given", nargs=-1, metavar="")
def hash_key(name: str, given: Sequence[str]) -> None:
    """Read a key from standard input; print the keys_file line to store instead of it (add quota or
    requests_per_minute inside the braces)."""
    from embedcache.serve import key_digest

    if given:  # click's own line echoed it: "Got unexpected extra argument (KEY)" (a review)
        raise click.UsageError(f"hash-key takes the key on standard input, not as an argument ({len(given)} given, "
                               "not shown: shell history and process listings keep arguments): "
                               "`embedcache serve hash-key < key.txt`")
    key = sys.stdin.readline().strip()
    if not key:
        raise click.UsageError("give the key on standard input, e.g. `embedcache serve hash-key < key.txt`")
    click.echo(f"{name}: {{sha256: {key_digest(key)}}}")


@serve.command("ledger")
@click.option("--config", "config_path", help="the server's config (its ledger path)")
@overrides_option("ledger=serve-ledger.sqlite")
def ledger(config_path: Optional[str], overrides: Sequence[str]) -> None:
    """What each key was charged: requests, queries, images, texts, bytes, free replays."""
    from embedcache.config import load_config
    from embedcache.errors import ConfigError
    from embedcache.serve import ServeConfig
    from embedcache.serve.ledger import ServerLedger

    cfg = load_config(ServeConfig, config_path or "demo", overrides, "serve")
    if not os.path.isfile(cfg.ledger):  # opening it would make an empty one, and "no charges yet" of the wrong one
        where = "" if os.path.isabs(cfg.ledger) else f" (a relative path, taken from {os.getcwd()})"
        raise ConfigError(f"no ledger at {cfg.ledger}{where}; run this where the server runs, or give its ledger "
                          "with --set ledger=/absolute/path.sqlite")
    rows = ServerLedger(cfg.ledger).summary()
    if not rows:
        click.echo(f"{cfg.ledger}: no charges yet")
    for r in rows:
        click.echo("  ".join(f"{k} {v}" for k, v in r.items()))
