"""`python -m serve ckpt=PATH [port=8000 ...]`: `python generate.py serve=true` by another name."""

import sys

from generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ["serve=true"]))
