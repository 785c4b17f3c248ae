"""API keys for `serve`: sha256 hashes only, compared in constant time; a key itself is never kept.

Keys come from an environment variable (comma-separated keys) and/or a file of sha256 hex digests,
one per line (`printf %s "$KEY" | sha256sum`). A request's key is hashed and compared with every
known hash, so neither a wrong key's length nor its prefix changes the time an answer takes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

HEX64 = re.compile(r"^[0-9a-f]{64}$")
ANONYMOUS = "anonymous"


class AuthSetupError(ValueError):
    """The server cannot start with this key setup (one line: the setting and the fix)."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def owner_of(digest: str) -> str:
    """The name a key's jobs are kept under: a prefix of its hash (never the key)."""
    return digest[:16]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class KeyCheck:
    hashes: tuple[str, ...]
    open_access: bool = False  # serve.allow_no_auth on loopback

    @classmethod
    def from_settings(cls, env_var: str, keys_file: str | None, allow_no_auth: bool, host: str) -> KeyCheck:
        hashes = [key_hash(k.strip()) for k in os.environ.get(env_var, "").split(",") if k.strip()]
        if keys_file:
            path = Path(keys_file).expanduser()
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise AuthSetupError(
                    f"serve.api_keys_file: cannot read {path} ({exc.strerror}); give a file of sha256 key hashes"
                ) from None
            for number, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip().lower()
                if not line:
                    continue
                digest = line.split()[0]  # `sha256sum` prints "<hash>  -"
                if not HEX64.match(digest):
                    raise AuthSetupError(
                        f"serve.api_keys_file: line {number} of {path} is not a sha256 hash; "
                        'write one per line, made with: printf %s "$KEY" | sha256sum'
                    )
                hashes.append(digest)
        if hashes:
            return cls(tuple(dict.fromkeys(hashes)))
        if not allow_no_auth:
            raise AuthSetupError(
                f"serve: no API keys are configured; set {env_var}=key1,key2 or serve.api_keys_file=FILE "
                "(sha256 hashes), or for a loopback-only server serve.allow_no_auth=true"
            )
        if not is_loopback(host):
            raise AuthSetupError(
                f"serve.allow_no_auth: a server without keys may only listen on loopback, not {host}; "
                f"set {env_var} or serve.api_keys_file, or serve.host=127.0.0.1"
            )
        return cls((), open_access=True)

    def owner(self, key: object) -> str | None:
        """The owner name of a valid key, None for an invalid one (every known hash compared, in constant time)."""
        given = key_hash(key) if isinstance(key, str) and key else ""
        if self.open_access:
            return owner_of(given) if given else ANONYMOUS
        if not given:
            return None
        match = False
        for known in self.hashes:
            match |= hmac.compare_digest(given, known)
        return owner_of(given) if match else None
