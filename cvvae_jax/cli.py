"""What every command-line entry point of the package shares: one-line errors.

A user who passes a wrong path wants one line that names it, not a traceback
wall; `run` turns any exception into `error: <message>` on stderr and exit
status 2 (130 on Ctrl-C). Tracebacks stay one environment variable away
(`CVVAE_TRACEBACK=1`) for bug reports.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def _ignore_closed_event_loop(unraisable) -> None:
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def quiet_libraries() -> None:
    """Silence the library chatter that would bury our own messages.

    Orbax logs every read through absl; after a failed read its other in-flight
    reads end in asyncio "never retrieved" errors and in TensorStore callbacks
    hitting the closed event loop (unraisable exceptions).
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = _ignore_closed_event_loop


def run(main: Callable[[], int | None]) -> int:
    """Call `main()`; any exception becomes one `error:` line and exit status 2."""
    quiet_libraries()
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a CLI failure is one line, whatever raised it
        if os.environ.get("CVVAE_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
