"""`fastserve scheduler`: run the scheduler process alone from a config file."""

from __future__ import annotations

import sys

from common.process import parse, run_process
from services.scheduler.service import Scheduler


def run_scheduler(config, log_level: str = "info") -> int:
    async def serve() -> None:
        scheduler = Scheduler.from_config(config)
        try:
            await scheduler.run()
        finally:
            scheduler.close()

    return run_process("scheduler", serve, log_level=log_level)


def main(argv: list[str]) -> int:
    args, config = parse("fastserve scheduler", "run the scheduler process alone", argv)
    return run_scheduler(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
