"""The SECRET_KEY when the environment sets none: generated once, kept in a file.

Django signs sessions (the admin's among them) with SECRET_KEY, so a key anyone can read
in the source would let anyone forge an admin session. With SECRET_KEY unset the router
therefore never falls back to a fixed key: the first process to start writes a random
one to `var/secret_key` (beside the embedded database, git-ignored, mode 0600) and every
later process, and every later start, reads that file.

Invariants:
- The file, once visible, is complete: it is written to a private temporary file first
  and published with `os.link`, which fails if the name exists. So processes starting at
  once (`make run`'s management commands, test routers) all end up with the one key the
  first link published; a loser discards its own and reads the winner's.
- A key is never changed or overwritten here. An empty or unreadable file is an error
  that names the file, not a silent new key (that would log every admin out).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

KEY_BYTES = 50  # about 67 url-safe characters, more than Django's own generated keys


class SecretKeyError(RuntimeError):
    """The key file exists but cannot be used; the message names the file and the fix."""


def load_or_create(path: Path) -> str:
    """The key stored at `path`, created (random, mode 0600) if the file does not exist."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic publish; fails when another process was first
        except FileExistsError:
            return _read(path)
    finally:
        tmp.unlink(missing_ok=True)
    sys.stderr.write(
        f"nomyo-router: SECRET_KEY is not set; generated one in {path} (mode 0600), "
        "used from now on. Set SECRET_KEY to use your own.\n"
    )
    return key


def _read(path: Path) -> str:
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise SecretKeyError(f"{path} is empty: delete it to generate a new key, or set SECRET_KEY")
    return key
