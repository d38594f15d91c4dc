"""`python tests/rl/run_grpo_with_test_domain.py OVERRIDES...`: `python -m rl.grpo` with the
test-only `first_char` domain registered (tests/rl/first_char_domain.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

if __name__ == "__main__":
    from tests.rl.first_char_domain import register

    register()
    from rl.grpo import main

    main()
