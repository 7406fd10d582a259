"""Doorbells: let idle engines sleep in the kernel instead of polling MPI.

An MPI rank can only learn of a message by polling, and every poll costs a
wake-up (about 50 us of CPU on a small VM; with 32 engines on 2 cores, polling
engines starve the ones doing the work). An engine with nothing in flight
therefore blocks in ``poll(2)`` on a TCP connection to the controller (its
doorbell), a pipe that another of its threads writes to when it needs it awake,
and its captured output. Each time the controller sends a header, it then writes
one byte to every doorbell; the engines wake and poll MPI until they have
received that header (they count rings and headers: an engine that has seen as
many headers as it was rung for may sleep again), and the command's
collectives run at full speed. A ring costs the controller one ``send`` per
engine. Connections authenticate with a per-job token sent over MPI; an engine
that cannot connect keeps polling (slower wake-ups and more idle CPU, but
correct).

The doorbell also carries an engine's last words. Engines never write to it
otherwise, so any bytes the controller reads from one say why that engine is
ending: a fatal signal's report (``faulthandler`` writes it there) or
:meth:`Bell.last_words`. Its end of file says the process is gone.
"""
from __future__ import annotations

import ctypes
import faulthandler
import hmac
import logging
import os
import select
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

DEEP_SLEEP = 2.0  # the longest sleep: a safety net, should a ring ever be lost
_HELLO = struct.Struct("!32sI")


class Bell:
    """An engine's side: sleep until rung, woken by another thread, or timed out.

    One thread at a time sleeps on a Bell (a poll object must not be used by two
    threads at once); the engine hands it over under a lock.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.sock: Optional[socket.socket] = None
        self.rings = 0  # bytes read from the doorbell: one per header broadcast since
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)

    def watch_fd(self, fd: int) -> None:
        """Also end sleeps when ``fd`` becomes readable (captured output)."""
        self._poll.register(fd, select.POLLIN)

    def connect(self, addresses: Sequence[str], port: int, token: bytes, engine_id: int,
                timeout: float = 5.0) -> bool:
        for addr in addresses:
            try:
                sock = socket.create_connection((addr, port), timeout=timeout)
                sock.sendall(_HELLO.pack(token, engine_id))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 1-byte writes
                sock.setblocking(False)
            except OSError:
                continue
            self.sock = sock
            self._poll.register(sock, select.POLLIN)
            # A segfault in user code (or a C extension) is reported before the
            # process dies: MPI launchers end the whole job right after.
            faulthandler.enable(file=sock.fileno(), all_threads=False)
            return True
        log.warning("engine %d: no doorbell (tried %s:%d); polling instead",
                    engine_id, addresses, port)
        return False

    def wake(self) -> None:
        """Called from another thread: end the current or next sleep at once."""
        try:
            os.write(self._w, b"w")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True if woken by a ring or a wake()."""
        if seconds < 0.001:
            # A busy exchange: poll() counts whole milliseconds, and the caller looks
            # at its work after every short nap anyway, so wake-ups can wait.
            time.sleep(seconds)
            return False
        events = self._poll.poll(int(seconds * 1000))
        if events:
            sock = self.sock
            for fd, mask in events:
                if sock is not None and fd == sock.fileno() and mask & (
                        select.POLLHUP | select.POLLERR):
                    self._drop()
            self._drain([fd for fd, _mask in events])
            return True
        return False

    def last_words(self, text: str, wait: float = 2.0) -> None:
        """Tell the controller why this process is about to end, then give it up to
        ``wait`` seconds to tell the clients (it ends the job when it has)."""
        sock = self.sock
        data = text.encode("utf-8", "replace")
        deadline = time.monotonic() + wait
        try:
            while sock is not None and time.monotonic() < deadline:
                if data:
                    try:
                        data = data[sock.send(data):]
                    except BlockingIOError:
                        select.select([], [sock], [], 0.05)
                elif select.select([sock], [], [], 0.05)[0]:
                    try:
                        if not sock.recv(4096):
                            return  # the end of file: the controller has done its part
                    except BlockingIOError:
                        pass  # the listener thread took the rings
        except (OSError, ValueError):
            pass  # closed under us: the controller is gone already

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def _drain(self, ready: Sequence[int]) -> None:
        """Read what ``poll`` found waiting on our pipe and doorbell (one read each:
        anything left makes the next ``poll`` return at once)."""
        sock = self.sock
        for fd in ready:
            is_bell = sock is not None and fd == sock.fileno()
            if fd != self._r and not is_bell:
                continue  # captured output: the caller drains it
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue  # last_words took it
            except OSError:
                self._drop()
                continue
            if is_bell:
                if data:
                    self.rings += len(data)
                else:
                    self._drop()  # the controller closed it: it is gone

    def _drop(self) -> None:
        if self.sock is not None:
            faulthandler.disable()
            try:
                self._poll.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self._drop()
        os.close(self._r)
        os.close(self._w)


class Alarm:
    """A one-shot timer for one thread to sleep on, armed and disarmed by another.

    An engine's main thread arms it before it runs a command and disarms it when the
    reply has left; the listener thread, asleep on it, wakes only if the command takes
    longer than that. A command that ends in time costs two system calls and no
    wake-up. Linux ``timerfd``; where there is none, :meth:`arm` wakes the sleeper at
    once (correct, one wake-up per command).
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)
        self._fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
            self._settime = libc.timerfd_settime
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self._fd = fd
            self._spec = (ctypes.c_long * 4)()  # struct itimerspec: interval, value
            self._poll.register(fd, select.POLLIN)

    def arm(self, seconds: float) -> None:
        """Have the sleeper woken ``seconds`` from now, unless disarmed before."""
        if self._fd < 0:
            self.wake()
            return
        whole = int(seconds)
        self._spec[2], self._spec[3] = whole, int((seconds - whole) * 1e9)
        self._settime(self._fd, 0, self._spec, None)

    def disarm(self) -> None:
        if self._fd >= 0:
            self._spec[2] = self._spec[3] = 0
            self._settime(self._fd, 0, self._spec, None)

    def wake(self) -> None:
        """End the current or next sleep at once."""
        try:
            os.write(self._w, b"w")
        except BlockingIOError:
            pass

    def sleep(self, seconds: float) -> bool:
        """Sleep until the alarm rings, a wake(), or ``seconds``; True unless timed out."""
        if not self._poll.poll(int(seconds * 1000)):
            return False
        for fd in (self._r, self._fd):
            try:
                while fd >= 0 and os.read(fd, 4096):
                    pass
            except BlockingIOError:
                pass
        return True

    def close(self) -> None:
        for fd in (self._r, self._w, self._fd):
            if fd >= 0:
                os.close(fd)


class BellTower:
    """The controller's side: accept the engines' doorbells and ring them."""

    def __init__(self, local_only: bool) -> None:
        self.token = os.urandom(32)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1" if local_only else "0.0.0.0", 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.bells: Dict[int, socket.socket] = {}

    def addresses(self, hostname: str) -> List[str]:
        """Where engines should dial, best first."""
        out = ["127.0.0.1"]
        try:
            out.insert(0, socket.gethostbyname(hostname))
        except OSError:
            pass
        return out

    def accept(self, n: int, timeout: float) -> None:
        """Accept up to ``n`` engines' doorbells (start-up only)."""
        deadline = time.monotonic() + timeout
        self.listener.settimeout(0.1)
        while len(self.bells) < n and time.monotonic() < deadline:
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                data = b""
                while len(data) < _HELLO.size:
                    chunk = sock.recv(_HELLO.size - len(data))
                    if not chunk:
                        break
                    data += chunk
                token, engine_id = _HELLO.unpack(data)
                if not hmac.compare_digest(token, self.token):
                    raise ValueError("bad doorbell token")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 1-byte rings
                sock.setblocking(False)
                self.bells[engine_id] = sock
            except (OSError, ValueError, struct.error):
                sock.close()
        self.listener.close()
        if len(self.bells) < n:
            log.warning("only %d of %d engines have doorbells", len(self.bells), n)

    def ring(self) -> None:
        """Ring every doorbell: a header has just been sent to every engine."""
        for engine_id, sock in list(self.bells.items()):
            try:
                sock.send(b"r")
            except BlockingIOError:
                pass  # thousands of unread rings queued: it will wake anyway
            except OSError:
                sock.close()
                del self.bells[engine_id]

    def watch(self, server: Any, on_lost: Callable[[int, str], None]) -> None:
        """Have ``server`` report an engine that is ending or gone, with the reason."""
        for engine_id, sock in self.bells.items():
            server.watch(sock, lambda i=engine_id, s=sock: self._check(i, s, on_lost))

    @staticmethod
    def _check(engine_id: int, sock: socket.socket,
               on_lost: Callable[[int, str], None]) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        # Act on the first bytes at once: the launcher ends every rank soon after one
        # has died. (A crash report comes in many small writes; the controller
        # reads the rest afterwards, for its log and the note.)
        on_lost(engine_id, data.decode("utf-8", "replace"))

    def read_rest(self, engine_id: int, timeout: float) -> str:
        """What else engine ``engine_id`` wrote before it ended (its full crash report)."""
        sock, data = self.bells.get(engine_id), b""
        deadline = time.monotonic() + timeout
        while sock is not None and time.monotonic() < deadline:
            if select.select([sock], [], [], 0.01)[0]:
                try:
                    more = sock.recv(65536)
                except OSError:
                    more = b""
                if not more:
                    break
                data += more
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        for sock in self.bells.values():
            sock.close()
        self.bells.clear()


def why_ended(text: str) -> str:
    """Why an engine ended, in one line, from what it wrote on its doorbell."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "its process ended (killed, or out of memory?)"
    if not lines[0].startswith("Fatal Python error:"):
        return lines[0]
    # faulthandler: the error, then the crashing thread's stack, innermost call first
    # ("Stack" or, when it dumps every thread, "Current thread" after the others).
    reason = lines[0][len("Fatal Python error:"):].strip() or "a fatal signal"
    stack = next((i for i, ln in enumerate(lines)
                  if ln.startswith(("Stack (", "Current thread"))), None)
    complete = text.endswith("\n") and lines
    where = None if stack is None else next(
        (ln for ln in lines[stack + 1:stack + 2]
         if ln.startswith("File ") and " in " in ln.rsplit('"', 1)[-1]
         and (ln != lines[-1] or complete)), None)
    return f"it crashed ({reason}{', ' + where if where else ''})"
