"""Files written whole or not at all, content digests, and a full disk as one line.

Every file a run, a sweep or an extraction writes goes through ``atomic_write``: the bytes go to
a temporary file beside the target, which replaces the target only once complete; on any error
the temporary file is removed, so a full disk or a kill never leaves half a file behind.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .errors import ConfigError, DiskFullError

PathLike = Union[str, Path]
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file under this process's umask


def json_kind(value: Any) -> str:
    """What a JSON value is, as JSON names it ('object', 'list', 'string', ...), for a line saying a file holds
    the wrong one."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` creates the file at ``tmp``; it then replaces ``path`` in one rename, with the
    mode a new file gets (safetensors writes owner-only files: a shared sweep's weights would be
    unreadable to the rest of a group)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        _set_mode(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        # a writer's error may not say the disk is full (torch.save: "unexpected pos ...", an iostream
        # error): the free space, or the half file grown to the file-size limit, looked at before it goes, does
        said = isinstance(exc, Exception) and not isinstance(exc, DiskFullError)
        limited = said and at_size_limit(tmp)
        full = said and (limited or is_disk_full(exc) or free_bytes(path.parent) < NEARLY_FULL)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, cause=exc, size_limit=limited) from exc
        raise
    return path


def file_size_limit() -> Optional[int]:
    """This process's file-size limit in bytes (`ulimit -f`, RLIMIT_FSIZE), None where there is none."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def at_size_limit(f: PathLike) -> bool:
    """Whether ``f`` has grown to this process's file-size limit: a writer that does not say EFBIG
    (torch.save: "unexpected pos") stopped there."""
    limit = file_size_limit()
    try:
        return limit is not None and os.stat(f).st_size >= limit
    except OSError:
        return False


NEARLY_FULL = 1 << 20  # bytes free under which a failed write is put down to a full disk


def free_bytes(folder: PathLike) -> int:
    """Bytes this process may still write on ``folder``'s file system: root writes into the blocks kept
    back from other users too (a large number when it cannot be asked)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def temp_files_of(folder: PathLike, name: str):
    """The temporary files ``atomic_write`` leaves beside ``name`` when its process is killed mid-write."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def _set_mode(path: Path) -> None:
    try:
        os.chmod(path, FILE_MODE)
    except OSError:  # file systems without POSIX modes: the file is written all the same
        pass


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: PathLike, kind: type, fix: str, error: type = ConfigError) -> Any:
    """A JSON file this package wrote (``kind``: dict or list), read whole; one that is not, edited by hand or
    damaged, is one line (``error``) naming it and ``fix`` (``json.loads`` died with a traceback)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, kind):
        raise error(f"{path} is damaged (not the JSON {json_kind(kind())} this package writes there); {fix}")
    return value


def json_digest(obj: Any, n: int = 16) -> str:
    """sha256 of the sorted-key compact JSON of ``obj``, first ``n`` hex characters."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def file_crc32c(path: PathLike) -> int:
    """CRC-32C of a file's bytes, read in 16 MB pieces (as the store checks its arrays)."""
    from .store.integrity import checksum

    crc = 0
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 24), b""):
            crc = checksum(piece, crc)
    return crc


def file_sha256(path: Path, _cache: Dict[Tuple[str, int, float], str] = {}) -> str:
    """Content hash of a file (16 hex chars): keys use contents, not paths, so moving a checkpoint
    keeps its stores valid. Memoised per (path, size, mtime) within a process."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime)
    if memo not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _cache[memo] = h.hexdigest()[:16]
    return _cache[memo]


def _in_chain(exc: Optional[BaseException], codes: Tuple[int, ...], texts: Tuple[str, ...], said: bool = False) -> bool:
    """An OSError of one of ``codes``, a message with one of ``texts`` (or with ``said``, a DiskFullError)
    anywhere in an exception's chain (torch.save wraps it in a RuntimeError whose message is all that is
    left of it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (said and isinstance(exc, DiskFullError)) or (isinstance(exc, OSError) and exc.errno in codes):
            return True
        if any(t in str(exc).lower() for t in texts):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _too_large(exc: Optional[BaseException]) -> bool:
    """A file grown to the process's file-size limit (``ulimit -f``, RLIMIT_FSIZE): EFBIG."""
    return _in_chain(exc, (errno.EFBIG,), ("[errno 27] file too large", "(os error 27)"))


def is_disk_full(exc: BaseException) -> bool:
    """No room to write: ENOSPC / EDQUOT, or the file-size limit (EFBIG), anywhere in an exception's chain."""
    return _too_large(exc) or _in_chain(exc, (errno.ENOSPC, errno.EDQUOT), (
        "no space left on device", "disk quota exceeded", "errno 28", "os error 28"), said=True)


def disk_full_error(where: PathLike, fix: str = "free space or choose --out on a larger disk",
                    cause: Optional[BaseException] = None, size_limit: bool = False) -> DiskFullError:
    """The one line for a write with no room (``cause``: the error, which may be the file-size limit;
    ``size_limit``: the limit met, where the error does not say so)."""
    if size_limit or _too_large(cause):
        return DiskFullError(f"a file reached the file-size limit set for this process (`ulimit -f`) while writing "
                             f"{where}; raise it (`ulimit -f unlimited`), then rerun the same command to resume")
    return DiskFullError(f"disk full while writing {where}; {fix}, then rerun the same command to resume")


def require_outside_store(path: PathLike, option: str = "--out") -> None:
    """An output inside a Zarr store would sit among its arrays, unchecked by verify: refused."""
    outermost_first = reversed(Path(os.path.abspath(path)).parents)  # the store, not its group image/
    store = next((a for a in outermost_first if (a / "zarr.json").is_file()), None)
    if store is not None:
        raise ConfigError(f"{option} {path} is inside the Zarr store {store}; write it outside the store")


def require_writable(path: PathLike, option: str = "--out", probe: bool = True) -> None:
    """Before long work that writes ``path`` (a store, its folder made if missing): refused in one line
    when it, or the nearest folder above it that exists, cannot be written (read-only storage, another
    user's folder), not once the teacher has loaded and the store's creation fails on it. ``probe``:
    False for a dry run, which writes nothing: permissions only, no file made and removed."""
    if not str(path).strip():  # read as no path by some commands and as the working folder by others
        raise ConfigError(f"{option} is empty; give a path, or leave {option} out for its default")
    require_outside_store(path, option)
    p = Path(os.path.abspath(path))
    if (p / "zarr.json").is_file():  # a run's, sweep's or report's files would land among the store's
        raise ConfigError(f"{option} {path} is a Zarr store; give another {option}, outside it")
    at = next((a for a in (p, *p.parents) if a.exists()), None)
    if at is None:
        return
    if at != p and not at.is_dir():
        raise ConfigError(f"{option} {path}: {at} is a file, where the path needs a folder; give another {option}")
    problem = "" if os.access(at, os.W_OK) else "read-only storage, or its permissions"
    if probe and not problem and at.is_dir():  # what access() lets pass may still refuse a file (root on /proc, a quota)
        probe = at / f".embedcache-probe-{uuid.uuid4().hex}"
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(at, f"free space or choose another {option}", exc) from exc
            problem = exc.strerror or type(exc).__name__
    if problem:
        raise ConfigError(f"{option} {path}: {at} is not writable ({problem}); choose another {option}")


@contextmanager
def one_line_when_full(where: PathLike, fix: str = "free space or choose --out on a larger disk"):
    """A full disk inside the block (an ``OSError`` of ENOSPC or EDQUOT) as one line naming ``where``
    and ``fix`` (``DiskFullError``: the command says it, and rerunning resumes); one said already passes."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(where, fix, exc) from exc
        raise


@contextmanager
def exclusive_lock(path: PathLike, probe: bool = False):
    """Hold an exclusive ``flock`` on ``path`` (created if needed; with ``probe``, an existing one opened
    read-only) for the block, waiting for it."""
    fd = _flocked(path, wait=True, probe=probe)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def try_exclusive_lock(path: PathLike, probe: bool = False):
    """An open file descriptor holding an exclusive ``flock`` on ``path`` (created if needed; with
    ``probe``, an existing one opened read-only), or None when another process holds it. The kernel
    releases it when the holder closes it, exits or dies."""
    return _flocked(path, wait=False, probe=probe)


def _flocked(path: PathLike, wait: bool, probe: bool = False):
    """An fd of ``path`` (created if needed) holding its exclusive ``flock``; None when ``wait`` is False
    and another process holds it. ``probe``: only an existing file, opened for writing where it can be (NFS
    maps flock to POSIX locks, whose exclusive kind needs it), else read-only (a reader without write access
    to a store may still see whether a writer holds it)."""
    import fcntl

    fd = _open_probe(path) if probe else os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_probe(path: PathLike) -> int:
    try:
        return os.open(path, os.O_RDWR)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY)


def utc_now() -> str:
    """Now, as the manifests and store records write it (UTC, ISO 8601, to the second)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
