"""The store contract: layout, manifest, cache key, row blocks with checksums, and the checks
readers make. ``Store`` is the only door to a store; backends are its plumbing."""
from .backends import BACKENDS, backend_name_for
from .integrity import IntegrityReport, checksum
from .layout import BLOCK_ARRAYS, SCHEMA_VERSION, STATUS_FAILED, STATUS_OK, add_text_arrays, cache_key, plan_layout
from .books import USAGE_SNAPSHOTS, is_counter
from .store import TABLES, Store, names_disagree, teacher_model

__all__ = ["Store", "IntegrityReport", "checksum", "cache_key", "plan_layout", "add_text_arrays", "SCHEMA_VERSION",
           "STATUS_OK", "STATUS_FAILED", "BLOCK_ARRAYS", "TABLES", "USAGE_SNAPSHOTS", "BACKENDS", "backend_name_for",
           "is_counter", "names_disagree", "teacher_model"]
