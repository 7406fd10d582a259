"""Reach a controller on a compute node through an SSH tunnel from the login node.

``MultiEngineClient(path, sshserver='login1')`` starts ``ssh -N -L`` to forward a
local port to the controller's address as seen from ``sshserver``, and connects
through it. The tunnel's ssh process belongs to the client and ends, by pid,
when the client closes. Authentication and TLS still run end to end, so the
SSH host only ever sees ciphertext or authenticated frames.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from typing import Optional

from .errors import ConnectError


class Tunnel:
    def __init__(self, sshserver: str, ip: str, port: int, timeout: float = 15.0) -> None:
        with socket.socket() as s:  # a free local port
            s.bind(("127.0.0.1", 0))
            self.local_port = s.getsockname()[1]
        ssh = shlex.split(os.environ.get("MPIENGINE_SSH", "ssh"))
        cmd = ssh + ["-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                     "-L", f"127.0.0.1:{self.local_port}:{ip}:{port}", sshserver]
        try:
            self.proc: Optional[subprocess.Popen] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise ConnectError(f"cannot run {ssh[0]} for a tunnel to {sshserver}: {e}") from e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                raise ConnectError(f"ssh tunnel through {sshserver} to {ip}:{port} failed: "
                                   f"{err or 'ssh exited with code %d' % self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.local_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise ConnectError(f"ssh tunnel through {sshserver} to {ip}:{port} did not come up "
                           f"within {timeout} s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
