"""``embedcache serve``: one registered teacher behind an HTTP embedding service, with API keys
(kept hashed), per-key rate limits and quotas, request size limits, a ledger of what each key was
charged, and idempotent retries (``pip install 'embedcache[serve]'``: FastAPI and uvicorn).

``build_app(cfg)`` loads the teacher and returns the ASGI app; ``serve(cfg)`` runs it with uvicorn.
"""
from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import threading
from typing import Callable, Optional

from ..errors import ConfigError, TeacherLoadError
from .config import ServeConfig
from .keys import KeyRing, key_digest

__all__ = ["ServeConfig", "KeyRing", "key_digest", "build_app", "serve"]


def _need_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise TeacherLoadError(f"embedcache serve needs the serve extra ({exc.name} is missing); "
                               f"run: pip install 'embedcache[serve]'") from None


def build_app(cfg: ServeConfig, teacher=None, keys: Optional[KeyRing] = None):
    """The app around ``teacher`` (built from ``cfg.teacher`` if not given)."""
    _need_fastapi()
    from ..teachers import build_teacher, check_new
    from .app import create_app
    from .ledger import ServerLedger

    if cfg.teacher.name == "remote":
        raise ConfigError("embedcache serve serves a local teacher (open_clip, conse, ...), not teacher.name=remote")
    keys = keys or KeyRing.load(cfg.keys_file, cfg.keys_env)
    if teacher is None:
        check_new(cfg.teacher)
    teacher = teacher or build_teacher(cfg.teacher)
    return create_app(teacher, cfg, keys, ServerLedger(cfg.ledger))


def serve(cfg: ServeConfig, log: Callable[[str], None] = print, teacher=None) -> None:
    """Run until Ctrl-C. Behind a reverse proxy, set ``root_path`` to its prefix and
    ``forwarded_allow_ips`` to its address; TLS ends at the proxy."""
    _require_free_port(cfg.host, cfg.port)  # before the teacher loads and "serving" is said
    app = build_app(cfg, teacher)
    import uvicorn

    service = app.state.service
    log(f"serving {cfg.teacher.name} teacher as {cfg.model_name!r} (fingerprint {service.fingerprint}, "
        f"D={service.teacher.embed_dim}, input {service.teacher.input_size} px) on http://{cfg.host or '0.0.0.0'}:"
        f"{cfg.port}{cfg.root_path}; ledger {cfg.ledger}")
    beyond = reached_from(cfg.host)
    if beyond:
        log(f"note: {beyond} can reach it over plain HTTP, the API keys of its requests in clear: serve it behind a "
            "TLS-terminating reverse proxy (root_path, forwarded_allow_ips), or keep host=127.0.0.1")
    # Ctrl-C or SIGTERM: uvicorn answers the requests in flight, then re-raises the signal into the handler
    # it found; SIGTERM's default would end the process (-15) before this last line
    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, root_path=cfg.root_path, proxy_headers=True,
                    forwarded_allow_ips=cfg.forwarded_allow_ips, log_level=cfg.log_level, server_header=False)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log(f"stopped; every charge is in the ledger {cfg.ledger} (`embedcache serve ledger` prints them)")


def reached_from(host: str) -> str:
    """Who beyond this machine can reach a server listening on ``host`` ('' for no one: a loopback address;
    '' and 0.0.0.0 listen on every interface, as uvicorn binds them)."""
    if host in ("", "0.0.0.0", "::"):
        return "every network this machine is on"
    try:
        address = ipaddress.ip_address(host if ":" in host else socket.gethostbyname(host))
    except (OSError, ValueError):
        return f"the network of {host}"
    return "" if address.is_loopback else f"the network of {host}"


def _require_free_port(host: str, port: int) -> None:
    """A one-line error when another process listens on ``port`` (uvicorn's bind error came after the
    teacher had loaded and "serving" was said, as exit 3), or the host is none of this machine's. Port 0
    takes any free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another `embedcache serve`?); give another --port, "
                                  "or stop what listens there") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); give another --host or --port") from None


def _stop(_signum, _frame) -> None:
    raise KeyboardInterrupt
