"""mpiengine: an MPI job as an interactive parallel computer.

Layout (imports point down only; see docs/architecture.md):

    magics  cli                         user-facing (may print; magics imports IPython)
    client  launcher                    the user's side
      mapping display codec channel tunnel
    runtime                             under mpiexec only
      controller server doorbell tls    rank 0
      enginerank engine capture         ranks 1..N
      fabric                            the only module that imports mpi4py
    protocol connection results payload partition errors     shared by both sides

Importing this package imports neither mpi4py nor IPython: that is left to
``mpiengine.fabric`` (ranks under mpiexec) and ``mpiengine.magics`` (IPython).
"""
from __future__ import annotations

from .errors import (AuthenticationError, ClusterLost, CommandTimeout, CompositeError,
                     ConnectError, MPIEngineError, RemoteError, ReplyTooLarge)

__version__ = "0.1.0"

__all__ = ["CompositeError", "RemoteError", "ConnectError", "AuthenticationError",
           "ClusterLost", "CommandTimeout", "ReplyTooLarge", "MPIEngineError", "__version__"]


def load_ipython_extension(ip):  # noqa: ANN001 - IPython's hook signature
    """``%load_ext mpiengine``: connect to the default cluster and enable the magics."""
    from .magics import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip):  # noqa: ANN001
    """``%unload_ext mpiengine``: forget the active client and turn %autopx off."""
    from .magics import unload_ipython_extension as unload

    unload(ip)
