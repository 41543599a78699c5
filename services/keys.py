"""`fastserve keys DIR`: write the CURVE key files of a stack (common/curve.py, docs/DEPLOY.md)."""

from __future__ import annotations

import argparse
import sys

from common.curve import CLIENT, CLIENTS_DIR, PUBLIC, SECRET, STACK, make_keys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastserve keys", description="make the CURVE keypairs of a stack "
                                     "(set security.curve = true and security.keys_dir = DIR to use them)")
    parser.add_argument("dir", metavar="DIR", help="folder to write them to (made if missing)")
    parser.add_argument("--force", action="store_true", help="replace existing key files")
    args = parser.parse_args(argv)
    try:
        written = make_keys(args.dir, args.force)
    except OSError as e:  # FileExistsError: keys are there already
        print(f"fastserve keys: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"every process of the stack needs {STACK}{PUBLIC} and {STACK}{SECRET} (keep the secret from clients);\n"
          f"clients need {CLIENT}{PUBLIC}, {CLIENT}{SECRET} and {STACK}{PUBLIC}; put further client public keys "
          f"in {args.dir}/{CLIENTS_DIR}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
