"""`fastserve kvcache`: run the KV-cache manager process alone from a config file."""

from __future__ import annotations

import sys

from common.process import parse, run_process
from services.kvcache.service import KVCacheManager


def run_kvcache(config, log_level: str = "info") -> int:
    async def serve() -> None:
        manager = KVCacheManager.from_config(config)
        try:
            await manager.run()
        finally:
            manager.close()

    return run_process("kvcache", serve, log_level=log_level)


def main(argv: list[str]) -> int:
    args, config = parse("fastserve kvcache", "run the KV-cache manager process alone", argv)
    return run_kvcache(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
