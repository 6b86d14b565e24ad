"""Teachers (a registry): ``build_teacher(cfg)`` returns a loaded teacher."""
from typing import Optional

from ..config import TeacherConfig
from ._base import TEACHERS, Teacher, resolve_device
from . import conse, open_clip, remote  # noqa: F401  (registers them)


def build_teacher(cfg: TeacherConfig, embed_dim: Optional[int] = None) -> Teacher:
    """``embed_dim``: the dimension a store records of it, for a teacher that would otherwise pay a query to
    learn it (``asks_dim``: a service that does not say it)."""
    kind = TEACHERS.get(cfg.name)
    teacher = kind(cfg, embed_dim=embed_dim) if embed_dim and getattr(kind, "asks_dim", False) else kind(cfg)
    teacher.config = cfg  # how it was built: a store made with it records this, so readers can rebuild it
    return teacher


__all__ = ["TEACHERS", "Teacher", "build_teacher", "resolve_device"]
