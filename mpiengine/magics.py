"""IPython magics that run code on the engines: ``%px``, ``%%px``, ``%autopx``, ``%result``.

This is the only module that imports IPython; the client imports it inside
``MultiEngineClient.activate()``, so plain scripts never pay for IPython.

Design:

- State lives on one :class:`ParallelMagics` instance per shell (the active
  client, the last result the magics produced, whether ``%autopx`` is on).
  :func:`activate` finds or registers that instance and sets its client.
- Every magic that runs code goes through :meth:`ParallelMagics.run`, which
  calls ``client.execute`` and returns what IPython should show as ``Out[n]``:
  the ``ResultList`` in blocking mode, the ``PendingResult`` otherwise. Live
  output, when it comes, belongs there and nowhere else.
- ``%autopx`` adds an input transformer (cleanup stage, so it sees the text as
  typed) that rewrites each cell into a ``%%px`` call carrying the original
  source; IPython then displays its value like any other cell. Cells that call
  our own magics stay local, which is how ``%autopx`` switches itself off.
  ``run_cell`` is never patched.
"""
from __future__ import annotations

import re
from argparse import ArgumentTypeError
from typing import Any, Callable, List, Optional, Union

try:
    from IPython import get_ipython
    from IPython.core.error import UsageError
    from IPython.core.magic import (Magics, cell_magic, line_magic, magics_class,
                                    no_var_expand)
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the mpiengine magics need IPython (pip install ipython); "
        "the client itself works without it: call mec.execute() directly") from e

from .errors import ConnectError

__all__ = ["ParallelMagics", "activate", "deactivate", "magics_for",
           "load_ipython_extension"]

Targets = Union[str, int, List[int]]

#: Magics that keep running locally while %autopx is on (future %px* magics go here).
LOCAL_MAGICS = ("autopx", "px", "result")
_LOCAL_RE = re.compile(r"^%{1,2}(?:" + "|".join(LOCAL_MAGICS) + r")\b")

_NO_CLIENT = ("no active MultiEngineClient: call mec.activate() on a connected "
              "client, or run %load_ext mpiengine")


def parse_targets(text: str) -> Targets:
    """Parse ``--targets``: an engine id, a comma list such as ``1,3``, or ``all``."""
    text = text.strip()
    if text == "all":
        return "all"
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise ArgumentTypeError(
            f"expected an engine id, a comma list like 1,3, or all; found {text!r}")
    return ids[0] if "," not in text else ids


class _AutopxTransformer:
    """Rewrite each cell into ``%%px`` with the cell's original text."""

    # check_complete() skips transformers with side effects. It must see the raw
    # cell, or a terminal would run "for i in x:" before the loop body is typed.
    has_side_effects = True

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    def __call__(self, lines: List[str]) -> List[str]:
        source = "".join(lines)
        if not source.strip() or self._runs_locally(source):
            return lines
        call = f"get_ipython().run_cell_magic('px', '', {source!r})"
        # A trailing ';' hides Out[n] locally; keep that habit working in autopx.
        if source.rstrip().endswith(";"):
            call += ";"
        return [call + "\n"]

    def _runs_locally(self, source: str) -> bool:
        first = source.lstrip().splitlines()[0].strip()
        if _LOCAL_RE.match(first):
            return True
        # With automagic on, a bare "autopx" is the magic too (as in the reference).
        return bool(self.shell.automagic) and source.strip() == "autopx"


@magics_class
class ParallelMagics(Magics):
    """The parallel magics of one IPython shell, bound to its active client."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: Any = None
        self._last: Any = None          # last result produced through the magics
        self._last_client: Any = None   # the client that produced it
        self._autopx: Optional[_AutopxTransformer] = None

    # -- the one place code goes to the engines --------------------------------

    def run(self, source: str, targets: Optional[Targets] = None,
            block: Optional[bool] = None) -> Any:
        """Run ``source`` on the engines; return what IPython shows as ``Out[n]``.

        ``targets`` and ``block`` of None mean the client's own defaults. A
        ``CompositeError`` propagates: IPython renders the remote tracebacks.
        """
        client = self._require_client()
        result = client.execute(source, targets=targets, block=block)
        self._last, self._last_client = result, client
        return result

    def _require_client(self) -> Any:
        if self.client is None:
            raise UsageError(_NO_CLIENT)
        return self.client

    # -- %px and %%px ----------------------------------------------------------

    @no_var_expand  # the code runs remotely: "{x}" and "$x" must not be expanded here
    @line_magic("px")
    def px_line(self, line: str = "") -> Any:
        """Run one line of code on the active client's targets: %px a = 1"""
        if not line.strip():
            raise UsageError("%px needs code to run, e.g. %px import numpy")
        return self.run(line)

    @magic_arguments()
    @argument("--targets", type=parse_targets, default=None,
              help="engines to run on: an id, a comma list like 1,3, or all "
                   "(default: the client's targets)")
    @argument("--block", action="store_true", help="wait for the result")
    @argument("--noblock", action="store_true",
              help="return a PendingResult at once")
    @cell_magic("px")
    def px_cell(self, line: str, cell: str) -> Any:
        """Run the whole cell on the engines."""
        args = parse_argstring(self.px_cell, line)
        if args.block and args.noblock:
            raise UsageError("%%px takes --block or --noblock, not both")
        block = True if args.block else False if args.noblock else None
        return self.run(cell, targets=args.targets, block=block)

    # -- %autopx ---------------------------------------------------------------

    @line_magic
    def autopx(self, line: str = "") -> None:
        """Toggle running every cell on the engines; %autopx again to stop."""
        if self._autopx is None:
            self._require_client()
            self.enable_autopx()
            print("Auto Parallel Enabled\nType %autopx to disable")
        else:
            self.disable_autopx()
            print("Auto Parallel Disabled")

    def enable_autopx(self) -> None:
        """Start sending every cell to the engines (quietly)."""
        if self._autopx is None:
            self._autopx = _AutopxTransformer(self.shell)
            # Last in the cleanup stage: pasted prompts and common indent are gone.
            self.shell.input_transformers_cleanup.append(self._autopx)

    def disable_autopx(self) -> None:
        """Stop sending cells to the engines (quietly)."""
        transformers = self.shell.input_transformers_cleanup
        if self._autopx is not None and self._autopx in transformers:
            transformers.remove(self._autopx)
        self._autopx = None

    @property
    def autopx_enabled(self) -> bool:
        return self._autopx is not None

    # -- %result ---------------------------------------------------------------

    @line_magic
    def result(self, line: str = "") -> Any:
        """Show each engine's result of the last command, waiting if it is pending."""
        if line.strip():
            raise UsageError("%result takes no arguments")
        last = self.last_result(self._require_client())
        if last is None:
            raise UsageError("no command has run yet: try %px print('hello')")
        if hasattr(last, "get_result"):  # a PendingResult: fetch it, as in the reference
            last = last.get_result(block=True)
        return last

    def last_result(self, client: Any) -> Any:
        """Return the result of ``client``'s last execute, magic or not."""
        ours = self._last if self._last_client is client else None
        getter: Optional[Callable[[], Any]] = getattr(client, "last_result", None)
        theirs = getter() if callable(getter) else None
        # After a %px the two are the same object. A different one from the
        # client is a newer command: an execute() called directly since.
        return theirs if theirs is not None and theirs is not ours else ours


def magics_for(shell: Any) -> ParallelMagics:
    """Return ``shell``'s ParallelMagics, registering them on first use."""
    found = shell.magics_manager.registry.get(ParallelMagics.__name__)
    if isinstance(found, ParallelMagics):
        return found
    magics = ParallelMagics(shell)
    shell.register_magics(magics)
    return magics


def _shell(shell: Any) -> Any:
    shell = shell if shell is not None else get_ipython()
    if shell is None:
        raise RuntimeError(
            "activate() needs IPython or Jupyter: %px, %autopx and %result are "
            "IPython magics; outside IPython call mec.execute() directly")
    return shell


def activate(client: Any, shell: Any = None) -> ParallelMagics:
    """Make ``client`` the one %px, %%px, %autopx and %result use.

    Raises ``RuntimeError`` when no IPython shell is running.
    """
    magics = magics_for(_shell(shell))
    if magics.client is not client:
        magics._last, magics._last_client = None, None
    magics.client = client
    return magics


def deactivate(shell: Any = None) -> None:
    """Forget the active client and leave %autopx mode (e.g. when it closes)."""
    magics = magics_for(_shell(shell))
    magics.disable_autopx()
    magics.client = None
    magics._last, magics._last_client = None, None


def _connect() -> Any:
    # The only code here that needs the concrete client class: everything else
    # works with any object that has execute/block/targets (the tests use a fake).
    from .client import MultiEngineClient
    return MultiEngineClient()


def load_ipython_extension(ip: Any) -> None:
    """Register the magics and activate a client of the default cluster.

    Called by ``%load_ext mpiengine``. If no cluster answers, the magics are
    still registered and the reason is printed; ``mec.activate()`` works later.
    """
    magics = magics_for(ip)
    if magics.client is not None:  # loaded before: keep the client in use
        return
    try:
        mec = _connect()
    # Loading an extension must not fail because the cluster is down, whatever
    # the reason; the message says what went wrong.
    except Exception as e:
        why = str(e) if isinstance(e, (ConnectError, OSError)) else f"{type(e).__name__}: {e}"
        print(f"mpiengine: magics loaded, but no cluster is connected: {why}\n"
              "Start one (mpiengine start -n 4), then: from mpiengine import "
              "client; mec = client.MultiEngineClient(); mec.activate()")
        return
    activate(mec, shell=ip)
    name = "mec"
    if name not in ip.user_ns:
        ip.push({name: mec})
        print(f"mpiengine: connected; the client is `{name}` "
              f"(%px, %%px, %autopx and %result use it)")
    else:
        print("mpiengine: connected; %px, %%px, %autopx and %result use the new client")
