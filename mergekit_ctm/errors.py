"""The one error family the user is meant to read (standard library only: every layer may
use it), and how the command-line tools report failures.

An :class:`InputError` means the input (recipe, adapter, output path, parameter) is wrong and
the message says what and how to fix it; the command-line tools print it as one line and exit
with status 2. Anything else is an environment failure (OSError: exit 1) or a bug.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class InputError(ValueError):
    """Bad input; the message names the field, adapter, module or path at fault and the fix.

    Subclasses ValueError so pydantic validators turn it into a validation error with the field.
    """


_OS_HINTS = {
    errno.ENOSPC: "free some space or write the output elsewhere",
    errno.EDQUOT: "free some space or write the output elsewhere",
    errno.EACCES: "choose a path you may write to, or fix its permissions",
    errno.EPERM: "choose a path you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: write the output elsewhere",
    errno.ENOENT: "check the path",
}


def describe_os_error(exc: OSError) -> str:
    """'<strerror>: <path> (<what to do>)' in one line."""
    what = exc.strerror or str(exc) or type(exc).__name__
    path = f": {exc.filename!r}" if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno or -1)
    return f"{what}{path}" + (f" ({hint})" if hint else "")


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Turn the failures a user can act on into one line on stderr and an exit status.

    InputError -> exit 2; OSError -> exit 1; KeyboardInterrupt or SIGTERM -> exit 130.
    Anything else is a bug and keeps its traceback. SIGTERM is made to unwind like Ctrl-C so
    that staged output is removed on the way out.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except InputError as exc:
        _die(prog, str(exc), 2)
    except OSError as exc:
        _die(prog, describe_os_error(exc), 1)
    except KeyboardInterrupt:
        _die(prog, "interrupted", 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _die(prog: str, message: str, status: int) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(status)
