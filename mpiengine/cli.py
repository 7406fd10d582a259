"""The ``mpiengine`` command: serve, start, stop, status.

``serve`` is what runs under mpiexec (every rank); the other verbs are for the
user's shell and never import mpi4py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from . import connection

EPILOG = """examples:
  mpiexec -n 5 python -m mpiengine serve        controller + 4 engines, in the foreground
  mpiengine start -n 4                           a local cluster in the background
  mpiengine status                               its engines
  mpiengine stop                                 shut it down
  mpiexec -n 5 python -m mpiengine run driver.py  batch mode: driver.py drives this job
  mpiengine sbatch -n 4 --submit                  a SLURM job; then 'mpiengine wait'
"""


def _add_where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None,
                   help="cluster name; its connection file is "
                        "~/.mpiengine/security/controller-PROFILE.json (default: 'default')")
    p.add_argument("--connection-file", default=None, metavar="PATH",
                   help="use this connection file instead of the profile's")


def _add_listen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", default="127.0.0.1",
                   help="address, interface name (eth0) or '*' to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    p.add_argument("--tls", choices=("auto", "on", "off"), default="auto",
                   help="encrypt client traffic with a per-job certificate; auto: on unless "
                        "listening on loopback (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpiengine", description="Drive an MPI job interactively from IPython or Jupyter.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("serve", help="run as one rank of 'mpiexec -n N+1' (rank 0: controller)")
    _add_where(p)
    _add_listen(p)
    p.add_argument("--max-message-size", type=int, default=None, metavar="BYTES",
                   help="refuse client messages larger than this (default 16 GiB)")

    p = sub.add_parser("run", help="batch mode: run a driver script against this job's "
                                   "engines (every rank of mpiexec -n N+1)")
    p.add_argument("driver", help="the Python script; MultiEngineClient() in it finds the engines")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")

    p = sub.add_parser("wait", help="wait until a cluster answers (e.g. a queued batch job)")
    _add_where(p)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait (default 600)")

    p = sub.add_parser("sbatch", help="print (or submit) a SLURM batch script for a cluster")
    p.add_argument("-n", "--engines", type=int, required=True, metavar="N")
    _add_where(p)
    p.add_argument("--time", default="01:00:00", help="wall time (default 01:00:00)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--ip", default="*", help="what the controller listens on (default '*': "
                                             "all interfaces, with TLS)")
    p.add_argument("--launcher", choices=("srun", "mpiexec"), default="srun")
    p.add_argument("--submit", action="store_true", help="submit it with sbatch")

    p = sub.add_parser("start", help="start a local cluster in the background")
    p.add_argument("-n", "--engines", type=int, required=True, metavar="N",
                   help="number of engines (mpiexec gets N+1 ranks)")
    _add_where(p)
    _add_listen(p)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for every engine to answer (default 120)")

    for verb, text in (("stop", "shut a cluster down"), ("status", "list a cluster's engines")):
        p = sub.add_parser(verb, help=text)
        _add_where(p)
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("MPIENGINE_DEBUG") else logging.WARNING,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    if args.verb is None:
        build_parser().print_help()
        return 2
    if args.verb == "run":
        from . import runtime  # imports mpi4py: only ever under mpiexec

        return runtime.serve(runtime.ServeOptions(
            connection_file="", driver=[args.driver] + list(args.args)))
    try:
        # With both, the file is where the cluster's file lives and the profile its name.
        profile = None if args.connection_file else args.profile
        path = connection.resolve_path(args.connection_file, profile)
    except ValueError as e:
        print(f"mpiengine: {e}", file=sys.stderr)
        return 2
    if args.verb == "serve":
        from . import runtime  # imports mpi4py: only ever under mpiexec

        kw = {}
        if args.max_message_size:
            kw["max_message"] = args.max_message_size
        return runtime.serve(runtime.ServeOptions(
            connection_file=path, profile=args.profile or "default", ip=args.ip,
            port=args.port, tls=args.tls, **kw))

    from . import launcher

    try:
        if args.verb == "start":
            return launcher.start(args.engines, path, args.profile, args.ip, args.port,
                                  args.timeout, args.tls)
        if args.verb == "stop":
            return launcher.stop(path, args.timeout)
        if args.verb == "wait":
            return launcher.wait(path, args.timeout)
        if args.verb == "sbatch":
            return launcher.sbatch(args.engines, path, args.profile, args)
        return launcher.status(path, args.timeout)
    except launcher.LaunchError as e:
        print(f"mpiengine {args.verb}: {e}", file=sys.stderr)
        return 1
