"""What every command-line entry point of the package shares: one-line errors.

A user who passes a wrong path wants one line that names it, not a traceback
wall; `run` turns any exception into `error: <message>` on stderr and exit
status 2 (130 on Ctrl-C). Tracebacks stay one environment variable away
(`CVVAE_TRACEBACK=1`) for bug reports.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Callable


def _ignore_abandoned_reads(unraisable) -> None:
    e = unraisable.exc_value
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    # Orbax turns the GeneratorExit of a read closed unfinished into an Exception that
    # carries the array's whole TensorStore spec: ~60 lines per array of the checkpoint.
    abandoned = getattr(unraisable.object, "__name__", None) == "_read_array_index_and_device_put"
    if not (closed_loop or abandoned):
        sys.__unraisablehook__(unraisable)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def one_line_warnings() -> None:
    """Python warnings as one line each: the default format adds the source line that
    raised them, which tells a command-line user nothing."""
    warnings.formatwarning = _one_line_warning


def quiet_libraries() -> None:
    """Silence the library chatter that would bury our own messages.

    Orbax logs every read through absl; after a failed read its other in-flight
    reads end in asyncio "never retrieved" errors, in TensorStore callbacks hitting
    the closed event loop and in read coroutines closed unfinished (unraisable
    exceptions, thousands of lines for one failed restore).
    """
    one_line_warnings()
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = _ignore_abandoned_reads


def _flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for a flag that did not parse. ml_collections reports a config file that
    raised as that file's whole traceback inside the message, and a `--config.*` override
    naming no field as a bare KeyError / AttributeError of the missing key."""
    text = str(e)
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return f"{lines[0]} {lines[-1]}"
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    if isinstance(e, (KeyError, AttributeError, IndexError)) and overrides:
        key = re.match(r"\W*(\w+)", text)
        named = [o for o in overrides if key and re.search(rf"[.\]]{key[1]}\b", o)]
        if isinstance(e, IndexError) or not named:
            return f"{', '.join(overrides)}: {one_line(e)}"
        hint = re.search(r'Did you mean "(\w+)"', text)
        return (f"{', '.join(named)}: the config has no field {key[1]!r}"
                + (f"; did you mean {hint[1]!r}?" if hint else ""))
    return one_line(e)


def _flag_failure(e: Exception, argv: list[str]):
    if os.environ.get("CVVAE_TRACEBACK"):
        raise e
    print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def define_config(default: str, help_text: str):
    """ml_collections' `--config` flag. Without --config on the command line it loads
    `default` as it is defined, and applies the --config.* overrides then: a bad one fails
    here, before `app.run`, and is reported as `parse_flags` reports it."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default, help_text)
    except Exception as e:  # a bad config file, override or value
        _flag_failure(e, sys.argv)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`, with a flag that does
    not parse reported as one `error:` line and exit status 2, like every other failure."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except Exception as e:  # a bad config file, variant, override or value
        _flag_failure(e, argv)


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
