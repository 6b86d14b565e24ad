"""``embedcache synthesize``: a store of synthesised images from class names (data-free distillation)."""
from __future__ import annotations

from typing import Optional, Sequence

import click

from ._app import main, overrides_option


@main.command()
@click.option("--config", "config_path", required=True,
              help="a YAML file, or the name of a packaged synthesize config (`embedcache configs`)")
@click.option("--out", help="store path (.zarr folder, or .h5 for HDF5)")
@overrides_option("per_class=4")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def synthesize(config_path: str, out: Optional[str], overrides: Sequence[str], no_progress: bool) -> None:
    """Synthesise images for class names with diversified prompts, optimised against the teacher, and
    write them as an ordinary store (resumes if interrupted; a complete store is a no-op)."""
    from embedcache import interrupt
    from embedcache.synthesis import load_synthesize_config, synthesize as run

    cfg = load_synthesize_config(config_path, overrides, {"out": out, "progress": False if no_progress else None})
    stage = ["teacher"]
    what = {"styles": "stopping before any image is made (styles are learned again on the rerun)",
            "images": "stopping after this batch's iteration; finished blocks are kept"}

    def said(signum: int) -> None:
        if stage[0] == "teacher":  # nothing is held yet: at once (the conse teacher encodes 1,000 prompts as it loads)
            raise KeyboardInterrupt("stopped while the teacher loaded; nothing was made")
        click.echo(interrupt.stop_notice(signum, what[stage[0]]), err=True)

    with interrupt.graceful(said):
        res = run(cfg, log=click.echo, on_stage=lambda name: stage.__setitem__(0, name))
        late = interrupt.requested()
    if late and res.complete:  # the stop was said, and came as the last blocks were being finished (a trial)
        click.echo("note: the stop came as the store was being finished: it is complete", err=True)
    if not res.skipped:
        rate = res.images / res.seconds if res.seconds > 0 else 0.0
        click.echo(f"{res.images} images synthesised in {res.seconds:.1f}s ({rate:.3f} images/s); "
                   f"store {'complete' if res.complete else 'partial'}: {res.path}")
