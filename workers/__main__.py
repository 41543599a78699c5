"""`fastserve worker --stage K`: run one pipeline stage worker alone from a config file."""

from __future__ import annotations

import sys

from common.process import parse, run_process
from workers.service import StageWorker


def run_worker(config, stage: int, log_level: str = "info") -> int:
    async def serve() -> None:
        worker = StageWorker.from_config(config, stage)
        try:
            await worker.run()
        finally:
            worker.close()

    return run_process("worker", serve, stage=stage, log_level=log_level)


def main(argv: list[str]) -> int:
    args, config = parse("fastserve worker", "run one pipeline stage worker alone", argv, stage=True)
    return run_worker(config, args.stage, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
