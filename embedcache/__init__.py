"""embedcache: pay a vision-language teacher once, distil many students from its cached outputs.

The names below load on first use: ``import embedcache`` stays light, so the command line starts
(and takes Ctrl-C as one line) before pandas and torch are imported."""
from .errors import EmbedcacheError

__version__ = "0.1.0"
__all__ = ["open_store", "StoreReader", "ExtractConfig", "load_extract_config", "EmbedcacheError", "__version__"]
_LAZY = {"open_store": ".api", "StoreReader": ".api", "ExtractConfig": ".config", "load_extract_config": ".config"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
