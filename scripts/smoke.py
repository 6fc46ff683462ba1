"""Smoke-test a running Tabby behind our proxy: `make smoke URL=https://... TOKEN=auth_...`.

Four checks, each timed: health with the token, one completion, one chat stream (time to the first event), and a
websocket handshake on /subscriptions with the `graphql-transport-ws` subprotocol (Tabby's web chat, Answer Engine
and Pages use it). Prints a table; exits 1 if any check fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from shared.operations.smoke import smoke, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="Server URL, e.g. https://you--tabby-server.modal.run")
    ap.add_argument(
        "--token", required=True, help="A Tabby auth token (Settings > Account in Tabby's web UI)"
    )
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")) or not args.token:
        print("usage: smoke.py --url https://... --token auth_...", file=sys.stderr)
        return 2
    checks = smoke(url, args.token)
    print(table(url, checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
