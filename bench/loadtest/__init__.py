"""Open-loop load testing of a running stack (`fastserve loadtest`): plan, driver, report, plots, launch."""

from bench.loadtest.cli import main

__all__ = ["main"]
