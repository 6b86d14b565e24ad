"""embedcache: pay a vision-language teacher once, distil many students from its cached outputs.

The names below load on first use: ``import embedcache`` stays light, so the command line starts
(and takes Ctrl-C as one line) before pandas and torch are imported."""
from .errors import EmbedcacheError

__version__ = "0.1.0"
__all__ = ["open_store", "StoreReader", "ExtractConfig", "load_extract_config", "EmbedcacheError", "__version__"]
_LAZY = {"open_store": ".api", "StoreReader": ".api", "ExtractConfig": ".config", "load_extract_config": ".config"}


def __getattr__(name: str):
    from importlib import import_module

    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    try:  # `embedcache.store` after a bare `import embedcache`, as when the package imported its API eagerly
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":  # the submodule exists and lacks a package of its own: said
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
