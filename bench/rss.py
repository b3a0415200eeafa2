"""Memory of this process from ``/proc/self/status`` (Linux), for the benchmarks' children.

VmHWM is the peak RSS of this process image (``ru_maxrss`` would carry the parent's over
fork + exec). RssAnon / RssFile have no kernel-kept peak, so :class:`PeakSampler` samples
them on a thread. All values in KiB.
"""

from __future__ import annotations

import threading
from pathlib import Path

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")

# First lines of a child script (``python -c``) that measures itself with this module.
CHILD_PRELUDE = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
    "from bench.rss import PeakSampler, status\n"
)


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0])
    return out


class PeakSampler:
    """``with PeakSampler() as s: ...``: then ``s.peak`` holds the largest RssAnon and RssFile
    seen (sampled every ``every`` seconds) and ``s.base`` the status at the start."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.base = status()
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            now = status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            self._done.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
