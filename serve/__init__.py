"""An OpenAI-compatible server on a checkpoint: `python generate.py ckpt=PATH serve=true
[host=127.0.0.1 port=8000 max_batch=32 served_model_name=NAME speculative=false]` (or
`python -m serve ...` with the same keys). Routes and behaviour: `serve/app.py`; the engine
thread: `serve/worker.py`."""

from __future__ import annotations

import sys


def run_server(model, tokenizer, name: str, host: str, port: int, max_batch: int,
               log_level: str = "info", speculative: bool = False) -> None:
    """Serves until interrupted (Ctrl-C / SIGTERM: uvicorn finishes and the engine thread
    stops). `speculative`: the MTP block drafts in the engine (model/speculative_engine.py)."""
    import uvicorn

    from .app import Server, build_app

    app = build_app(Server(model, tokenizer, name, max_batch, speculative))
    sys.stderr.write(f"serving {name!r} on http://{host}:{port}/v1 (max_batch {max_batch}, "
                     f"context {model.cfg.max_seq_len})\n")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
