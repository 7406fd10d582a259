"""mpiengine: an MPI job as an interactive parallel computer.

Layout (imports point down only; see docs/architecture.md):

    magics  cli                     user-facing (may print; magics imports IPython)
    client  launcher                runtime (under mpiexec only)
    channel                         controller  server  enginerank  engine
    protocol connection results     fabric (the only module that imports mpi4py)
    payload partition errors

Importing this package imports neither mpi4py nor IPython: that is left to
``mpiengine.fabric`` (ranks under mpiexec) and ``mpiengine.magics`` (IPython).
"""
from __future__ import annotations

from .errors import (AuthenticationError, ClusterLost, CommandTimeout, CompositeError,
                     ConnectError, MPIEngineError, RemoteError)

__version__ = "0.1.0"

__all__ = ["CompositeError", "RemoteError", "ConnectError", "AuthenticationError",
           "ClusterLost", "CommandTimeout", "MPIEngineError", "__version__"]


def load_ipython_extension(ip):  # noqa: ANN001 - IPython's hook signature
    """``%load_ext mpiengine``: connect to the default cluster and enable the magics."""
    from .magics import load_ipython_extension as load

    load(ip)
