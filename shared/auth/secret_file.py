"""Where the HS256 token secret comes from: the environment, a file, or the default file.

A ``serve`` started with no secret creates the default file (``ensure_secret_file``), readable by
its user only, and ``kizuna-stream token`` on the same machine reads it by default, so the two
work together with no set-up.  The secret never comes from a command line (other users see
command lines in ``ps``).

Where, first found wins:

1. ``--secret-file PATH`` (``secret_file=``): the operator said which.
2. ``KIZUNA_TOKEN_SECRET``: the secret itself, at least 32 bytes (RFC 7518 §3.2).
3. The default file, ``$XDG_STATE_HOME/kizuna-stream/token-secret`` or
   ``~/.local/state/kizuna-stream/token-secret`` (XDG Base Directory: state is "data that
   should persist between restarts" but is not worth backing up).

A secret file readable or writable by group or others is refused: anyone who can read it can
mint tokens.  The file holds the secret as text (one line, surrounding whitespace ignored), so
the same value can be copied into ``KIZUNA_TOKEN_SECRET`` on another machine.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from shared.auth.tokens import MIN_SECRET_BYTES
from shared.errors import ConfigError

__all__ = [
    "SECRET_ENV",
    "default_secret_path",
    "ensure_secret_file",
    "load_secret",
    "read_secret_file",
]

SECRET_ENV: Final = "KIZUNA_TOKEN_SECRET"
_MAKE_ONE: Final = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def default_secret_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME", "")
    # The spec says a relative XDG_STATE_HOME is invalid and must be ignored.
    if state and os.path.isabs(state):
        base = Path(state)
    else:
        home = environ.get("HOME") or str(Path.home())
        base = Path(home) / ".local" / "state"
    return base / "kizuna-stream" / "token-secret"


def _checked(secret: bytes, where: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the token secret in {where} is {len(secret)} bytes; it must be at least "
            f"{MIN_SECRET_BYTES} (make one with: {_MAKE_ONE})"
        )
    return secret


def read_secret_file(path: str | Path) -> bytes:
    """The secret in ``path``; refused when group or others may read or write it."""
    path = Path(path)
    try:
        # Opened first, then checked through the descriptor: no window between check and read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(f"token secret file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open token secret file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"token secret file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"token secret file {path} is open to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); anyone who reads it can mint "
                f"tokens: chmod 600 {path}"
            )
        data = file.read(4096)
    return _checked(data.strip(), str(path))


def ensure_secret_file(path: str | Path | None = None) -> Path:
    """The server's secret file, created with a fresh secret (mode 0600) when absent."""
    path = Path(path) if path is not None else default_secret_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32).encode()  # 43 characters, 256 bits
    try:
        # O_EXCL: two servers starting at once must not both write (one would lose its secret
        # under the tokens it already issued); the loser reads the winner's file below.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        read_secret_file(path)  # the existing file must be usable
        return path
    with os.fdopen(fd, "wb") as file:
        file.write(secret + b"\n")
    return path


def load_secret(
    secret_file: str | Path | None = None,
    *,
    create: bool = False,
    environ: Mapping[str, str] | None = None,
) -> bytes:
    """The HS256 secret, from ``secret_file``, ``KIZUNA_TOKEN_SECRET`` or the default file.

    ``create``: make the default file when nothing else names a secret (what ``serve`` does);
    without it a missing default file is an error that says how to get a secret.
    """
    environ = os.environ if environ is None else environ
    if secret_file is not None:
        return read_secret_file(secret_file)
    from_env = environ.get(SECRET_ENV, "")
    if from_env:
        return _checked(from_env.strip().encode(), SECRET_ENV)
    path = default_secret_path(environ)
    if create:
        ensure_secret_file(path)
    elif not path.exists():
        raise ConfigError(
            f"no token secret: set {SECRET_ENV}, pass --secret-file, or start "
            f"`kizuna-stream serve` once on this machine (it creates {path})"
        )
    return read_secret_file(path)
