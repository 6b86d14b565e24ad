"""API keys for ``embedcache serve``: read from a file and/or an environment variable, kept only as
sha256 digests (in memory and in files: ``embedcache serve hash-key`` prints the line to store), and
matched by the digest of what a client presents. A key is known to the server by its name; its
bytes appear in no file the server writes."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from ..config import parse_yaml
from ..errors import ConfigError

_HEX = re.compile(r"^[0-9a-f]{64}$")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    name: str
    quota: Optional[int] = None                 # None: the server's default
    requests_per_minute: Optional[float] = None


class KeyRing:
    def __init__(self, keys: Dict[str, KeyInfo]):
        self._by_digest = dict(keys)  # sha256 hex -> KeyInfo

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self):
        return sorted(k.name for k in self._by_digest.values())

    def match(self, presented: str) -> Optional[KeyInfo]:
        return self._by_digest.get(key_digest(presented))

    @classmethod
    def load(cls, keys_file: Optional[str] = None, keys_env: Optional[str] = None) -> "KeyRing":
        out: Dict[str, KeyInfo] = {}
        if keys_file:
            path = Path(keys_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"keys_file {path} not found; create it with lines from `embedcache serve hash-key`")
            data = parse_yaml(path.read_text(), f"keys_file {path}") or {}
            if not isinstance(data, dict):
                raise ConfigError(f"keys_file {path} must map key names to {{sha256: HEX, quota: N}}")
            for name, spec in data.items():
                spec = {"sha256": spec} if isinstance(spec, str) else spec
                if not isinstance(spec, dict):
                    raise ConfigError(f"keys_file {path}: key {name!r} must be a mapping with sha256")
                if "sha256" in spec:
                    digest = str(spec["sha256"]).lower().removeprefix("sha256:")
                elif "key" in spec:  # accepted for convenience; hashed at once, never written anywhere
                    digest = key_digest(str(spec["key"]))
                else:
                    raise ConfigError(f"keys_file {path}: key {name!r} has no sha256 (`embedcache serve hash-key` makes one)")
                if not _HEX.match(digest):
                    raise ConfigError(f"keys_file {path}: key {name!r} sha256 is not 64 hex characters")
                quota = spec.get("quota")
                rpm = spec.get("requests_per_minute")
                out[digest] = KeyInfo(str(name), None if quota is None else int(quota), None if rpm is None else float(rpm))
        if keys_env and os.environ.get(keys_env, "").strip():
            for i, item in enumerate(p.strip() for p in os.environ[keys_env].split(",") if p.strip()):
                name, sep, key = item.partition(":")
                if not sep:
                    name, key = f"key{i}", item
                out[key_digest(key)] = KeyInfo(name.strip() or f"key{i}")
        if not out:
            raise ConfigError(f"no API keys: set ${keys_env or 'EMBEDCACHE_SERVE_KEYS'} (name:key,...) or keys_file "
                              f"(lines from `embedcache serve hash-key`); the server never runs open")
        return cls(out)
