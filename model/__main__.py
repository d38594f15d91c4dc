"""`python -m model conf=flash`: parameter table, total/activated parameters and KV-cache bytes.

`conf` takes a preset (tiny, small, flash, pro) or a path to a released `config.json`.
"""

from __future__ import annotations

import sys

from .config import get_config
from .summary import format_summary


def main(argv: list[str]) -> int:
    name = "tiny"
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "conf":
            name = value
        elif not sep and not arg.startswith("-"):
            name = arg
        else:
            print(f"usage: python -m model [conf=tiny|small|flash|pro|PATH/config.json] "
                  f"(got {arg!r})", file=sys.stderr)
            return 2
    try:
        cfg = get_config(name)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(cfg, name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
