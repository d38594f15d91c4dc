"""`python -m data.domains list` | `show NAME [--n 3] [--difficulty D] [--split test] ...`.

`show` prints each item's rendered conversation (the exact V4 text from `encode_messages`) and
what the verifier says about the reference completion, which is the quickest check that a
domain's rendering and verifier agree.
"""

from __future__ import annotations

import argparse
import sys

from data.domains.base import safe_verify
from data.domains import registry
from data.domains.registry import DOMAINS, get_domain
from encoding import encode_messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.domains", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the domains (built-in and $V4LAB_DOMAINS) and their levels")
    show = sub.add_parser("show", help="print rendered examples and the reference's score")
    show.add_argument("name", help=f"one of {', '.join(DOMAINS)} or rg:<task>")
    show.add_argument("--n", type=int, default=3)
    show.add_argument("--difficulty", type=int, default=None)
    show.add_argument("--split", default="train", choices=("train", "test"))
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--thinking-mode", default="chat", choices=("chat", "thinking"))
    args = parser.parse_args(argv)

    if args.command == "list":
        registry.load_plugins()
        for name, cls in registry.REGISTRY.items():
            print(f"{name:12s} levels {list(cls.levels)}  {cls.description}")
        print("rg:<task>    any reasoning-gym task (pip install 'v4lab[domains]')")
        return 0
    try:
        domain = get_domain(args.name, difficulty=args.difficulty,
                            thinking_mode=args.thinking_mode)
        items = domain.generate(args.split, args.n, args.seed)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for item in items:
        score = safe_verify(domain, item, item.reference_completion())
        print(f"=== {item.id}  answer={item.answer!r}")
        print(encode_messages(item.conversation, item.thinking_mode))
        print(f"--- reference: reward={score.reward} correct={score.correct} "
              f"format_valid={score.format_valid} reason={score.reason!r}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
