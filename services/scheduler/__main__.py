"""`fastserve scheduler`: run the scheduler process alone from a config file."""

from __future__ import annotations

import sys

from common import config as config_mod
from common.process import parse, run_service
from services.scheduler.service import Scheduler


def run_scheduler(config: config_mod.Config, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM; a crash is logged and turned into exit status 1."""
    return run_service("scheduler", lambda: Scheduler.from_config(config), log_level=log_level)


def main(argv: list[str]) -> int:
    args, config = parse("fastserve scheduler", "run the scheduler process alone", argv)
    return run_scheduler(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
