"""``serve``: what every rank of ``mpiexec -n N+1 python -m mpiengine serve`` runs.

Rank 0 becomes the controller, the other ranks engines. Any exception that
escapes either role aborts the whole MPI job, so no rank is left waiting in a
collective for a peer that is gone.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
import subprocess
import tempfile
import time
from typing import Any, List, Optional

from . import connection, fabric, tls
from . import protocol as P
from .controller import Controller
from .doorbell import Bell, BellTower
from .engine import Engine
from .enginerank import EngineRank
from .heap import Heap

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    connection_file: str
    profile: str = "default"
    ip: str = "127.0.0.1"
    port: int = 0
    max_message: int = P.DEFAULT_MAX_MESSAGE
    idle_cap: float = 0.02
    tls: str = "auto"
    #: With a driver (``mpiengine run``): the script and its arguments, run next to
    #: the controller against a private connection file; its exit status is the job's.
    driver: Optional[List[str]] = None


def serve(opts: ServeOptions) -> int:
    """Run this rank's role until the cluster is shut down; return an exit code."""
    world = None
    private = None
    try:
        world = fabric.World()
        if opts.driver and world.is_controller:
            # Batch mode: a connection file only this job knows, on loopback.
            private = tempfile.mkdtemp(prefix="mpiengine-run-")
            opts.connection_file = os.path.join(private, "controller.json")
            opts.ip, opts.tls = "127.0.0.1", "off"
        if world.is_controller:
            return _controller(world, opts)
        return _engine(world, opts)
    except SystemExit as e:  # a refusal with its own message (a file in use, a bad --ip)
        if e.code not in (None, 0):
            sys.stderr.write(f"{e.code}\n")
            sys.stderr.flush()
            if world is not None:
                time.sleep(0.5)  # let mpiexec forward the message before the abort
                world.abort(1)
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        if world is not None:
            world.abort(2)
        raise
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _engine(world: fabric.World, opts: ServeOptions) -> int:
    engine = Engine(world.engine_id, comm=world.user, host=socket.gethostname())
    world.exchange_info({"id": engine.id, "host": engine.host, "pid": os.getpid()})
    tower = world.share(None)
    bell = Bell()
    addresses = tower["addresses"]
    if engine.host == tower["host"]:
        addresses = ["127.0.0.1"] + addresses
    bell.connect(addresses, tower["port"], tower["token"], engine.id)
    _report_exits(world, bell)
    try:
        EngineRank(world, engine, bell, idle_cap=opts.idle_cap, heap=Heap()).run()
    finally:
        bell.close()
    return 0


def _report_exits(world: fabric.World, bell: Bell) -> None:
    """Have ``os._exit``, ``comm.Abort`` and ``MPI.COMM_WORLD.Abort`` in user code
    tell the controller before this engine ends. A forked child that calls
    ``os._exit`` (multiprocessing does) just exits."""
    real_exit, me = os._exit, os.getpid()

    def _aborting(name: str, code: int) -> None:
        if os.getpid() == me:
            bell.last_words(f"it called {name}.Abort({code})")

    world.report_aborts(_aborting)

    def _exit(status: int) -> None:
        if os.getpid() == me:
            bell.last_words(f"it called os._exit({status})")
        real_exit(status)

    os._exit = _exit


def _on_sigterm(signum: int, frame: Any) -> None:
    # scancel and mpiexec send SIGTERM: leave through the controller's finally block,
    # which removes the connection file, instead of dying on the spot.
    raise _Terminated()


class _Terminated(SystemExit):
    """The job is being ended from outside (SIGTERM)."""


def _controller(world: fabric.World, opts: ServeOptions) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    path = opts.connection_file
    _refuse_live_file(path)
    engines = [e for e in world.exchange_info({}) if e]
    host = socket.gethostname()
    tower = BellTower(local_only=all(e["host"] == host for e in engines))
    world.share({"host": host, "addresses": tower.addresses(host), "port": tower.port,
                 "token": tower.token})
    tower.accept(world.n_engines, timeout=30.0)
    ip = resolve_ip(opts.ip)
    key = connection.ConnectionInfo.new(ip, 0).key
    ssl_context, tls_info = None, None
    if tls.wanted(opts.tls, ip):
        cert, cert_key, fingerprint = tls.make_certificate(host)
        ssl_context = tls.server_context(cert, cert_key)
        tls_info = {"fingerprint": fingerprint}
    ctl = Controller(world, engines, ip, opts.port, bytes.fromhex(key), opts.max_message,
                     bells=tower, ssl_context=ssl_context, heap=Heap())
    info = connection.ConnectionInfo(ip=_advertised(ip), port=ctl.address[1], key=key,
                                     n_engines=world.n_engines, profile=opts.profile,
                                     tls=tls_info, max_message=opts.max_message)
    ctl.lost_note = path + ".lost"
    if os.path.exists(ctl.lost_note):  # from an earlier cluster of this file
        os.unlink(ctl.lost_note)
    try:
        connection.write(info, path)
    except FileExistsError:
        raise SystemExit(f"mpiengine: {path} appeared while starting; another cluster "
                         f"uses it. Pass --connection-file or --profile.") from None
    log.info("controller listening on %s:%d, %d engines", info.ip, info.port, world.n_engines)
    if not opts.driver:
        sys.stderr.write(f"mpiengine: {world.n_engines} engines ready on {info.ip}:{info.port}"
                         f"{' (TLS)' if tls_info else ''}; connection file {path}\n")
        sys.stderr.flush()
    driver = _start_driver(opts.driver, path) if opts.driver else None
    if driver is not None:
        ctl.on_tick = lambda: driver.poll() is not None and ctl.stop()
    try:
        ctl.run()
    except _Terminated:
        connection.remove(path, info)
        # The engines are being ended too: MPI_Finalize would wait for them in vain.
        os._exit(128 + signal.SIGTERM)
    finally:
        connection.remove(path, info)
    if driver is None:
        return 0
    try:
        return driver.wait(timeout=60)
    except subprocess.TimeoutExpired:  # the cluster is gone; the driver would only hang
        driver.kill()
        return driver.wait()


def _start_driver(argv: List[str], path: str) -> subprocess.Popen:
    """Run the user's driver script in its own process (no user code in the controller)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPI_LOCALRANK", "OMPI_", "SLURM_STEP"))}
    env[connection.ENV_FILE] = path
    return subprocess.Popen([sys.executable] + list(argv), env=env)


def _refuse_live_file(path: str) -> None:
    """Stop if ``path`` belongs to a cluster that still answers; clear a stale one."""
    if not os.path.exists(path):
        return
    try:
        old = connection.read(path)
    except Exception:
        os.unlink(path)
        return
    try:
        with socket.create_connection((old.ip, old.port), timeout=2.0):
            pass
    except OSError:
        os.unlink(path)  # stale: that cluster is gone
        return
    raise SystemExit(f"mpiengine: a running cluster already uses {path} "
                     f"({old.ip}:{old.port}, pid {old.pid}); stop it with 'mpiengine stop' "
                     f"or choose another --profile / --connection-file")


def resolve_ip(spec: str) -> str:
    """Turn --ip (an address, an interface name, or '*') into an address to bind."""
    if spec in ("*", "0.0.0.0", ""):
        return "0.0.0.0"
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in spec else socket.AF_INET, spec)
        return spec
    except OSError:
        pass
    addr = _interface_address(spec)
    if addr:
        return addr
    try:
        return socket.gethostbyname(spec)
    except OSError:
        raise SystemExit(f"mpiengine: --ip {spec!r} is neither an address, an interface "
                         f"name nor a resolvable host name") from None


def _interface_address(name: str) -> Optional[str]:
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                 struct.pack("256s", name[:15].encode()))
            return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def _advertised(bound: str) -> str:
    """The address clients should dial: the bound one, or this host's for a wildcard.

    Debian maps the host name to 127.0.1.1, which no other host can reach: then
    the first non-loopback address of a network interface is used instead.
    """
    if bound != "0.0.0.0":
        return bound
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    for _index, name in socket.if_nameindex():
        found = _interface_address(name)
        if found and not found.startswith("127."):
            return found
    return "127.0.0.1"
