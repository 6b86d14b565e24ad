"""The ``embedcache`` command line: parse, call the library, print. No logic lives here, and no
library module imports this package (tests/test_architecture.py checks the layers)."""
from . import data, students, evaluation, serve, synthesize  # noqa: F401  (register the commands)
from ._app import main

__all__ = ["main"]
