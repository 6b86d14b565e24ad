"""Teachers (a registry): ``build_teacher(cfg)`` returns a loaded teacher."""
from ..config import TeacherConfig
from ._base import TEACHERS, Teacher, resolve_device
from . import conse, open_clip, remote  # noqa: F401  (registers them)


def build_teacher(cfg: TeacherConfig) -> Teacher:
    teacher = TEACHERS.get(cfg.name)(cfg)
    teacher.config = cfg  # how it was built: a store made with it records this, so readers can rebuild it
    return teacher


__all__ = ["TEACHERS", "Teacher", "build_teacher", "resolve_device"]
