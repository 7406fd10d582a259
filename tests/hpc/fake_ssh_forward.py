"""Port forwarding for fake_ssh: what ``ssh -N -L [bind:]lport:dest:dport host`` does.

    fake_ssh_forward.py SPEC [SPEC ...] -- ENTER_HOST_COMMAND...
    fake_ssh_forward.py --relay DEST DPORT          (internal: one forwarded connection)

The listener runs where fake_ssh was called (the caller's network namespace). Each
accepted connection is handed, as stdin/stdout, to ``ENTER_HOST_COMMAND python
fake_ssh_forward.py --relay DEST DPORT``, which runs inside the ssh "server" host's
namespaces and dials DEST:DPORT from there: so the address is resolved and routed as
the ssh server sees it, which is the point of a tunnel. A socket handed to a child
keeps working across network namespaces (only new sockets are bound to one).

Like ssh with ExitOnForwardFailure=yes, a listener that cannot bind ends the process
with status 255. SIGTERM ends the forwarder and its relays (ssh's connections die
with it too). Only for tests: no authentication beyond being able to run it.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Tuple


def parse(spec: str) -> Tuple[str, int, str, int]:
    parts = spec.split(":")
    if len(parts) == 3:
        parts = ["127.0.0.1"] + parts
    if len(parts) != 4:
        raise SystemExit(f"fake_ssh: bad -L spec {spec!r} (want [bind:]lport:host:hport)")
    bind, lport, dest, dport = parts
    return bind or "127.0.0.1", int(lport), dest, int(dport)


def relay(dest: str, dport: int) -> int:
    """Copy bytes both ways between stdin (a socket) and a new connection to dest:dport."""
    here = socket.socket(fileno=os.dup(0))
    os.close(0)
    os.close(1)
    try:
        there = socket.create_connection((dest, dport), timeout=10)
    except OSError as e:
        sys.stderr.write(f"channel 0: open failed: connect failed: {e}\n")
        return 1
    there.settimeout(None)
    open_ends = {here: there, there: here}
    while open_ends:
        ready, _, _ = select.select(list(open_ends), [], [], 60)
        for src in ready:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            dst = open_ends[src]
            if data:
                try:
                    dst.sendall(data)
                    continue
                except OSError:
                    pass
            # EOF (or an error): pass the half-close on, stop reading this side
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            del open_ends[src]
    return 0


def forward(specs: List[str], enter: List[str]) -> int:
    listeners: Dict[socket.socket, Tuple[str, int]] = {}
    for spec in specs:
        bind, lport, dest, dport = parse(spec)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, lport))
        except OSError as e:
            sys.stderr.write(f"bind [{bind}]:{lport}: {e.strerror}\n"
                             f"Could not request local forwarding.\n")
            return 255
        s.listen(64)
        listeners[s] = (dest, dport)
    children: List[subprocess.Popen] = []

    def stop(signum: int, frame: object) -> None:
        for p in children:
            if p.poll() is None:
                p.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        ready, _, _ = select.select(list(listeners), [], [], 1.0)
        for s in ready:
            conn, _ = s.accept()
            dest, dport = listeners[s]
            children.append(subprocess.Popen(
                enter + [sys.executable, os.path.abspath(__file__), "--relay", dest, str(dport)],
                stdin=conn, stdout=conn))
            conn.close()
        children[:] = [p for p in children if p.poll() is None]


def main(argv: List[str]) -> int:
    if argv[:1] == ["--relay"]:
        return relay(argv[1], int(argv[2]))
    if "--" not in argv:
        raise SystemExit("usage: fake_ssh_forward.py SPEC... -- ENTER_HOST_COMMAND...")
    i = argv.index("--")
    return forward(argv[:i], argv[i + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
