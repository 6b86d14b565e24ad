"""Bounds that settings (``config.py``) and the CLI's options (``cli/``) share; a module of its own so that a
command's options, built as it starts, do not import the config machinery (yaml: 30 ms on every start)."""

SEED_MAX = 2**32 - 1  # what numpy's legacy seeding takes; a larger one crashed torch.manual_seed (a fuzz)
WORKERS_MAX = 1024  # a sweep's local worker processes: the sweep file's `workers` and `sweep --workers` alike
