"""`fastserve worker --stage K`: run one pipeline stage worker alone from a config file."""

from __future__ import annotations

import sys

from common import config as config_mod
from common.process import parse, run_service
from workers.service import StageWorker


def run_worker(config: config_mod.Config, stage: int, log_level: str = "info") -> int:
    """Serve stage `stage` until SIGINT/SIGTERM; a crash is logged and turned into exit status 1."""
    return run_service("worker", lambda: StageWorker.from_config(config, stage), stage, log_level)


def main(argv: list[str]) -> int:
    args, config = parse("fastserve worker", "run one pipeline stage worker alone", argv, stage=True)
    return run_worker(config, args.stage, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
