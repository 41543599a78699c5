"""Shared test setup: GPU tests skip without CUDA; FASTSERVE_REQUIRE_CUDA=1 (on GPU hosts) makes those skips failures."""

import os

import pytest

REQUIRE_CUDA = os.environ.get("FASTSERVE_REQUIRE_CUDA") == "1"
OPTIONAL = "optional:"  # a GPU test skipped with a reason starting so (an optional library) stays a skip


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_CUDA and report.skipped and "gpu" in item.keywords):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.removeprefix("Skipped: ").startswith(OPTIONAL):
        return
    report.outcome = "failed"
    report.longrepr = f"FASTSERVE_REQUIRE_CUDA=1 but this GPU test was skipped: {reason}"
