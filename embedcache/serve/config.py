"""``embedcache serve`` settings: one frozen dataclass, loaded like every stage's config
(``load_config(ServeConfig, "demo", ["port=9000"], kind="serve")``; packaged configs in configs/serve/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import TeacherConfig, setting
from ..errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    teacher: TeacherConfig = setting(factory=TeacherConfig)  # any registered teacher (not remote)
    host: str = "127.0.0.1"          # 0.0.0.0 only behind a TLS-terminating reverse proxy
    port: int = setting(8000, min=0, max=65535)
    model_name: str = "embedcache"   # the model name clients send and see in answers
    # API keys: a YAML file (name: {sha256: HEX, quota: N, requests_per_minute: R}) and/or an
    # environment variable ("name:key,name2:key2" or one bare key). Only their sha256 is kept.
    keys_file: Optional[str] = None
    keys_env: Optional[str] = "EMBEDCACHE_SERVE_KEYS"
    ledger: str = "serve-ledger.sqlite"  # what each key was charged, and answers kept for idempotent retries
    max_batch: int = setting(256, min=1)           # inputs in one request (413 above)
    max_request_bytes: int = setting(32 * 1024 * 1024, min=1024)  # request body (413 above)
    max_image_pixels: int = setting(4096 * 4096, min=64)  # a decoded image (413 above: decompression bombs)
    quota: Optional[int] = setting(None, min=0)    # queries (inputs) per key per quota period; None: unlimited
    quota_period_s: Optional[float] = setting(None, gt=0)  # None: the quota never renews
    requests_per_minute: Optional[float] = setting(None, gt=0)  # per key; None: unlimited
    root_path: str = ""              # the path prefix a reverse proxy serves it under, e.g. /embed
    forwarded_allow_ips: str = "127.0.0.1"  # proxies trusted for X-Forwarded-For/-Proto
    log_level: str = setting("info", choices=("critical", "error", "warning", "info", "debug"))

    def check(self) -> None:
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ConfigError(f"root_path={self.root_path!r} is not a path prefix: give it as the proxy serves it, "
                              "with a leading / and none at the end (e.g. /embed), or leave it empty")
