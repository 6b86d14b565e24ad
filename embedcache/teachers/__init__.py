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


def check_new(cfg: TeacherConfig) -> None:
    """Rules on a teacher's settings for new work only (a new store, a service): a store made before such a
    rule came reloads and repairs as it was made (open_clip: a teacher.model_config it would not use)."""
    check = getattr(TEACHERS.get(cfg.name), "check_new", None)
    if check is not None:
        check(cfg)


__all__ = ["TEACHERS", "Teacher", "build_teacher", "check_new", "resolve_device"]
