"""`fastserve ingress`: run the ingress process alone from a config file."""

from __future__ import annotations

import sys

from common import config as config_mod
from common.process import parse, run_process
from services.ingress.service import Ingress


def run_ingress(config: config_mod.Config, log_level: str = "info") -> int:
    """Serve clients until interrupted; a crash is logged and turned into exit status 1."""

    async def serve() -> None:
        ingress = Ingress.from_config(config)
        try:
            await ingress.run()
        finally:
            ingress.close()

    return run_process("ingress", serve, log_level=log_level)


def main(argv: list[str]) -> int:
    args, config = parse("fastserve ingress", "run the ingress process alone", argv)
    return run_ingress(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
