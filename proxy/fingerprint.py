"""Key fingerprints: what the proxy logs and stores instead of an API key (never the key itself)."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path


def fingerprint(key: str, secret: bytes) -> str:
    """HMAC-SHA256 of the key, shortened: stable for one secret, useless for recovering the key."""
    return hmac.digest(secret, key.encode(), "sha256").hex()[:16]  # one-shot C path: ~20x hmac.new


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """The configured secret, else one made once and kept in the data directory (mode 0600), so
    fingerprints, and the binding of tasks to keys, survive a restart."""
    if configured:
        return configured.encode()
    path = data_dir / "fingerprint.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    # written whole under another name, then linked into place: `serve --workers` starts several
    # processes at once, and each must read the one secret that won, never a half-written file
    draft = data_dir / f"fingerprint.secret.{os.getpid()}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
    try:
        os.link(draft, path)  # fails if another process was first: its secret is the one
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return path.read_bytes()
