"""`fastserve ingress`: run the ingress process alone from a config file."""

from __future__ import annotations

import argparse
import asyncio
import sys

from common import config as config_mod
from common.log import setup_logging
from services.ingress.service import Ingress


async def _serve(config: config_mod.Config) -> None:
    ingress = Ingress.from_config(config)
    try:
        await ingress.run()
    finally:
        ingress.close()


def run_ingress(config: config_mod.Config, log_level: str = "info") -> int:
    """Serve clients until interrupted; a crash is logged and turned into exit status 1."""
    log = setup_logging("ingress", level=log_level)
    try:
        asyncio.run(_serve(config))
    except KeyboardInterrupt:
        log.info("ingress_stopped")
        return 0
    except Exception:  # process boundary: log the cause and exit non-zero
        log.exception("ingress_crashed")
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastserve ingress", description="run the ingress process alone")
    parser.add_argument("--config", help="TOML config file (defaults when omitted)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config, args.set)
    except config_mod.ConfigError as e:
        print(f"fastserve ingress: {e}", file=sys.stderr)
        return 2
    return run_ingress(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
