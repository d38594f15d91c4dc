"""The sections of `python bench/gpu_check.py`, one module each, in the order they run:
`env`, `correctness`, `kernel_speed`, `train_step`, `generation`, `newton_schulz`.

Each exports `run(ctx) -> Result` (`common.py`); the runner writes every result to JSON and a
markdown table as soon as its section ends, so a check cut short keeps what it measured.
"""
