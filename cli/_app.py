"""The ``embedcache`` click group: user errors as one line, Ctrl-C as one line, with exit codes.

Exit codes: 0 ok; 1 some sweep runs failed; 2 a user error (bad setting, unknown name, mismatched
or damaged store; out of memory); 3 a paid teacher's budget or quota ran out (resumable); 4 a remote teacher's
answer that cannot be kept; 75 try again later: a full disk, an unreachable remote teacher or one asking for a
longer wait than allowed, a store or run held by another live process (resumable: free space or wait, and rerun);
130 interrupted by Ctrl-C, 143 by SIGTERM (resumable: rerun the same command). The README's Exit codes say more.
"""
from __future__ import annotations

import errno
import gc
import importlib
import signal
import sys
import warnings

import click

from embedcache.errors import EmbedcacheError, first_line, one_line_warning, out_of_memory


NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
# The compiled libraries a command imports, imported whole before it runs: a Ctrl-C inside their import left numpy
# half-imported (an ImportError traceback, exit 1) or ended in torch's pybind11 code (abort, exit 134) (a trial).
LIBRARIES = ("numpy", "pandas", "torch")
NEEDS = {"configs": (), "inspect": ("numpy", "pandas"), "report": ("numpy", "pandas")}  # the others: LIBRARIES


class Command(click.Command):
    """A command whose libraries are imported whole once its options are parsed (a usage error stays instant)."""

    def invoke(self, ctx):
        import_whole(NEEDS.get(self.name, LIBRARIES))
        return super().invoke(ctx)


class Group(click.Group):
    command_class = Command  # its sub-groups' commands (serve's hash-key, configs') read no array
    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's own usage errors (a missing path, an unknown option) as one line too."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            return self._main(*args, **kwargs)

    def _main(self, *args, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS as exc:  # a bare `embedcache` (or group): its help
            click.echo(exc.format_message())
            sys.exit(0)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "embedcache"
            click.echo(f"error: {exc.format_message()} (`{where} --help` lists what it takes)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        from embedcache import interrupt

        interrupt.one_request_per_signal()
        try:
            return self._invoke(ctx)
        finally:
            interrupt.end_of_command()

    def _invoke(self, ctx):
        from embedcache import interrupt

        try:
            return super().invoke(ctx)
        except EmbedcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (MemoryError, RuntimeError) as exc:  # a batch, size or count too large for this machine
            if not out_of_memory(exc):
                raise
            click.echo(f"error: out of memory ({first_line(exc)}); lower batch_size or the sizes and counts set, or "
                       "free memory (other processes, another GPU), then rerun the same command to resume", err=True)
            sys.exit(2)  # not 75: a scheduler retrying the same settings would meet it again
        except (FileExistsError, NotADirectoryError) as exc:  # a path through a file: --out a/b with a a file
            said = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
            click.echo(f"error: {said} (a file stands where the path needs a folder); give another path, or move "
                       "that file", err=True)
            sys.exit(2)
        except OSError as exc:  # a path the user gave that cannot be written (checked early where it can be)
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}; check its permissions, or give another path", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            term = interrupt.stopped_by() == signal.SIGTERM
            msg = str(exc) if str(exc) and " " in str(exc) else "interrupted; rerun the same command to resume"
            if term and not msg.startswith("terminated"):  # a scheduler's log says what stopped it
                msg = "terminated (SIGTERM): " + msg.removeprefix("interrupted; ")
            exc.__traceback__ = None  # the interrupted frames go now (DataLoader workers shut down in __del__),
            gc.collect()              # not at the exit, where a repeated signal would cut them into a traceback
            click.echo(msg, err=True)
            sys.exit(128 + interrupt.stopped_by())  # 130 after Ctrl-C, 143 after SIGTERM


def import_whole(modules) -> None:
    """``modules`` imported with a stop request deferred to their end (then one line, exit 130)."""
    from embedcache import interrupt

    with interrupt.deferred("starting"):
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:  # the command says what it lacks, where it needs it
                pass


@click.group(cls=Group)
@click.version_option(package_name="embedcache")
def main() -> None:
    """Cache a vision-language teacher's embeddings once; distil students from the cache."""


def overrides_option(example: str):
    """The repeatable ``--set KEY=VALUE`` option; ``example`` is a key of this command's own config."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"override a config key (value parsed as YAML), e.g. --set {example}")
