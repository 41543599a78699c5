"""Structured logging (structlog): one setup per process binding its role and stage to every event."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")


def setup_logging(role: str, stage: int | None = None, level: str = "info", json: bool = False) -> Any:
    """Configure structlog for this process and return a logger with role (and stage) bound.

    Events go to stderr as key=value lines (or JSON lines with json=True, for log collectors).
    Bind the job with `log.bind(job_id=...)` or `bound(job_id=...)` where a job is handled.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}; use one of {', '.join(LEVELS)}")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    context: dict[str, Any] = {"role": role}
    if stage is not None:
        context["stage"] = stage
    structlog.contextvars.bind_contextvars(**context)
    return structlog.get_logger()


def get_logger(**bound: Any) -> Any:
    """A logger with extra keys bound (e.g. job_id); role and stage come from setup_logging."""
    return structlog.get_logger().bind(**bound)


def bound(**values: Any) -> Any:
    """Context manager binding keys (e.g. job_id) to every event logged inside it in this task."""
    return structlog.contextvars.bound_contextvars(**values)
