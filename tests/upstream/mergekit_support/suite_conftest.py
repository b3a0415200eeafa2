"""conftest.py for one run of mergekit's upstream tests (copied to the suite's root folder).

The harness (``tests/upstream/test_mergekit_suite.py``) runs the suite twice, with
``MERGEKIT_CTM_HARNESS_MODE`` set to ``off`` or ``on``. This file

- checks that the run really is what it claims: ``off``: the startup hook is not installed and
  none of our methods is registered; ``on``: the hook is installed, ``import mergekit_ctm`` is
  forced, and the adapter methods are in mergekit's registry. Anything else stops the run with a
  usage error, so the comparison can never pass vacuously;
- writes every test's outcome (by node id, with the failure text) as JSON to
  ``MERGEKIT_CTM_HARNESS_REPORT``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

MODE = os.environ["MERGEKIT_CTM_HARNESS_MODE"]
REPORT = os.environ["MERGEKIT_CTM_HARNESS_REPORT"]
ADAPTER_METHODS = {"ctm", "core_space", "mtc", "lora_lego"}


def _registered() -> set[str]:
    from mergekit import merge_methods

    return {m.spec.name for m in merge_methods.registered_methods()}


def _check_mode() -> list[str]:
    import mergekit_ctm_hook

    if MODE == "off":
        if mergekit_ctm_hook.installed():
            raise pytest.UsageError("plugin-off run: the mergekit-ctm startup hook is installed")
        registered = _registered()
        if "mergekit_ctm" in sys.modules or registered & ADAPTER_METHODS:
            raise pytest.UsageError("plugin-off run: mergekit-ctm registered its methods")
    elif MODE == "on":
        if not mergekit_ctm_hook.installed():
            raise pytest.UsageError("plugin-on run: the mergekit-ctm startup hook is not installed")
        import mergekit_ctm  # noqa: F401  (the Python users' path, on top of the hook)

        registered = _registered()
        if not ADAPTER_METHODS <= registered:
            missing = sorted(ADAPTER_METHODS - registered)
            raise pytest.UsageError(f"plugin-on run: {missing} not in mergekit's registry")
    else:
        raise pytest.UsageError(f"MERGEKIT_CTM_HARNESS_MODE={MODE!r}: expected 'off' or 'on'")
    return sorted(registered)


_REGISTERED = _check_mode()
_RESULTS: dict[str, dict[str, str]] = {}
# Later phases only make an outcome worse: a failing teardown turns a pass into an error.
_RANK = {"passed": 0, "xfailed": 0, "xpassed": 0, "skipped": 1, "failed": 2, "error": 3}


def _record(nodeid: str, outcome: str, message: str = "") -> None:
    old = _RESULTS.get(nodeid)
    if old is None or _RANK[outcome] > _RANK[old["outcome"]]:
        _RESULTS[nodeid] = {"outcome": outcome, "message": message[-4000:]}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if hasattr(report, "wasxfail"):
        outcome = "xpassed" if report.passed else "xfailed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    _record(report.nodeid, outcome, report.longreprtext if report.failed else "")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _record(report.nodeid or "<collection>", "error", report.longreprtext)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    with open(REPORT, "w", encoding="utf-8") as f:
        json.dump({"mode": MODE, "registered": _REGISTERED, "results": _RESULTS}, f, indent=1)
