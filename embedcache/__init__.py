"""embedcache: pay a vision-language teacher once, distil many students from its cached outputs."""
from .api import StoreReader, open_store
from .config import ExtractConfig, load_extract_config
from .errors import EmbedcacheError

__version__ = "0.1.0"
__all__ = ["open_store", "StoreReader", "ExtractConfig", "load_extract_config", "EmbedcacheError", "__version__"]
