"""The connection file: where a cluster listens and the key to talk to it.

The controller writes it once its engines are up; clients read it. It holds a
secret, so it is created with mode 0600 and ``O_EXCL`` under a temporary name
in the same directory and renamed into place: there is never a moment in which
the key is readable by others or a half-written file is visible.

The file of profile ``P`` is ``~/.mpiengine/security/controller-P.json``
(``$MPIENGINE_DIR`` replaces ``~/.mpiengine``).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import ConnectError

__all__ = ["ConnectionInfo", "default_path", "profile_path", "resolve_path", "write", "read"]

ENV_FILE = "MPIENGINE_CONNECTION_FILE"
ENV_DIR = "MPIENGINE_DIR"


def base_dir() -> str:
    return os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".mpiengine")


def profile_path(profile: Optional[str] = None) -> str:
    name = profile or "default"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"a profile name is letters, digits, '-', '_' or '.'; got {name!r}")
    return os.path.join(base_dir(), "security", f"controller-{name}.json")


def default_path() -> str:
    return os.environ.get(ENV_FILE) or profile_path(None)


def resolve_path(path: Optional[str] = None, profile: Optional[str] = None) -> str:
    """Pick the file: an explicit path, else a profile, else $MPIENGINE_CONNECTION_FILE, else default."""
    if path and profile:
        raise ValueError("give either a connection file path or a profile, not both")
    if path:
        return os.path.abspath(os.path.expanduser(path))
    if profile:
        return profile_path(profile)
    return default_path()


@dataclass
class ConnectionInfo:
    """What a client needs to reach a controller. ``key`` is hex and secret."""

    ip: str
    port: int
    key: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    n_engines: int = 0
    profile: str = "default"
    tls: Optional[dict] = None
    max_message: int = 16 * 2**30
    version: int = 1

    @classmethod
    def new(cls, ip: str, port: int, **kw) -> "ConnectionInfo":
        return cls(ip=ip, port=port, key=secrets.token_hex(32), **kw)

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)

    def __repr__(self) -> str:  # the key never appears in a repr
        return (f"ConnectionInfo(ip={self.ip!r}, port={self.port}, host={self.host!r}, "
                f"pid={self.pid}, n_engines={self.n_engines}, profile={self.profile!r})")


def write(info: ConnectionInfo, path: str) -> None:
    """Create ``path`` atomically with mode 0600; raise FileExistsError if a file is there."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(info), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        # link() fails if the target exists, unlike rename(): never clobber a live file.
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def read(path: str) -> ConnectionInfo:
    """Read a connection file; raise ConnectError naming it if it is missing or bad."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConnectError(
            f"no connection file at {path}: is a cluster running? Start one with "
            f"'mpiengine start -n 4' or 'mpiexec -n 5 python -m mpiengine serve'") from None
    except PermissionError as e:
        raise ConnectError(f"cannot read connection file {path}: {e.strerror}") from e
    except (OSError, ValueError) as e:
        raise ConnectError(f"connection file {path} is not valid JSON: {e}") from e
    try:
        info = ConnectionInfo(**{k: data[k] for k in data if k in ConnectionInfo.__dataclass_fields__})
        bytes.fromhex(info.key)
        int(info.port)
    except (TypeError, ValueError, KeyError) as e:
        raise ConnectError(f"connection file {path} lacks ip, port or key: {e}") from e
    return info


def remove(path: str, info: ConnectionInfo) -> None:
    """Delete the file if it is still ours (same key): a newer cluster's file stays."""
    try:
        if read(path).key == info.key:
            os.unlink(path)
    except (ConnectError, OSError):
        pass
