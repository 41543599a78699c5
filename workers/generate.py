"""`fastserve generate`: offline in-process generation, printing one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from common.config import ConfigError, load
from workers.model.sampling import SamplingParams
from common.model.spec import ModelError
from common.model.tokenizer import load_tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastserve generate", description="greedy (or sampled) continuation of one prompt")
    p.add_argument("--model", help="'smollm2-135m' (default), 'tiny' or a Hugging Face checkpoint directory (overrides the config)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--prompt", help="prompt text (needs a tokenizer); adds \"text\" to the output")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-ids", default="", help="comma-separated token ids")
    p.add_argument("--ignore-eos", action="store_true")
    return p


def _ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ModelError(f"{what} must be comma-separated integers, not {text!r}") from None


def run(argv: list[str]) -> dict:
    from workers.offline import OfflineEngine

    args = parser().parse_args(argv)
    overrides = list(args.set) + ([f"model.path={args.model}"] if args.model else [])
    config = load(args.config, overrides)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_token_ids=tuple(_ids(args.stop_token_ids, "--stop-token-ids")),
                            ignore_eos=args.ignore_eos)
    tokenizer = None
    if args.prompt is not None:
        tokenizer = load_tokenizer(config.model.path)
        if tokenizer is None:
            raise ModelError(f"model {config.model.path!r} has no tokenizer.json; use --prompt-ids")
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = _ids(args.prompt_ids, "--prompt-ids")
    engine = OfflineEngine.from_config(config)
    engine.check(prompt, params)
    output = engine.generate([prompt], [params])[0]
    result: dict = {"token_ids": output}
    if tokenizer is not None:
        result["text"] = tokenizer.decode(output)
    return result


def main(argv: list[str]) -> int:
    try:
        result = run(argv)
    except (_UsageError, ModelError, ConfigError, ValueError) as e:
        print(f"fastserve generate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
