"""Standard benchmarks on a v4lab checkpoint: lm-evaluation-harness tasks through v4lab's own
model (`python -m train.evaluate ckpt=PATH domains=[] lm_eval_tasks=[mmlu,gsm8k,hellaswag]`).

`V4LabLM` is lm-eval's model interface over the training model and its tokenizer:
- `loglikelihood` (multiple choice: MMLU, HellaSwag, ARC, ...): the context is BOS + its tokens,
  the continuation its own tokens; one teacher-forced forward per batch of right-padded
  requests (causal: padding after a row changes nothing before it), summing the
  continuation's log-probs and checking that each of its tokens is the argmax;
- `loglikelihood_rolling` (perplexity tasks): BOS + the text, in windows of the model context,
  each window after the first conditioned on the context tokens before it;
- `generate_until` (GSM8K, ...): the rollout engine (`model/engine.py`), greedy unless the task
  samples, stopping at EOS or any of the task's `until` strings (cut from the text, as lm-eval
  expects), at most `max_gen_toks` tokens.

The datasets come through `datasets` as lm-eval configures them, so on a machine that reaches
the Hub the model card's base-model table (MMLU, GSM8K, HellaSwag, ...) can be reproduced for
any run; here it is tested on a local task (a YAML task file and a JSONL the test writes).
lm-eval is an optional extra: `pip install 'v4lab[eval]'`.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import torch

from data.optional import require


def import_lm_eval():
    """lm_eval and its model base class, or ImportError naming the extra."""
    lm_eval = require("lm_eval", "lm_eval_tasks", "eval", "lm-eval>=0.4.5")
    from lm_eval.api.model import LM

    return lm_eval, LM


def make_lm(model, tokenizer, batch_size: int = 16, max_gen_toks: int = 256):
    """A `V4LabLM` (the class is built on first use, so lm-eval stays optional)."""
    _, LM = import_lm_eval()

    class V4LabLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.tok, self.batch = model, tokenizer, batch_size
            self.max_gen_toks = max_gen_toks
            self.context = model.cfg.max_seq_len

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [(self._ids(r.args[0], bos=True), self._ids(r.args[1]))
                     for r in requests]
            return score_continuations(self.model, pairs, self.batch)

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for r in requests:
                ids = self._ids(r.args[0], bos=True)
                total, start = 0.0, 1
                while start < len(ids):  # windows of the context, conditioned on what precedes
                    stop = min(len(ids), start + self.context - 1)
                    left = max(0, stop - self.context)
                    (lp, _), = score_continuations(self.model, [(ids[left:start],
                                                                 ids[start:stop])], 1)
                    total, start = total + lp, stop
                out.append(total)
            return out

        def generate_until(self, requests) -> list[str]:
            return generate_texts(self.model, self.tok, [r.args for r in requests],
                                  self.batch, self.max_gen_toks)

        def _ids(self, text: str, bos: bool = False) -> list[int]:
            ids = self.tok.encode(text, add_special_tokens=False)
            return ([self.tok.bos_token_id] if bos else []) + ids

    return V4LabLM()


@torch.no_grad()
def score_continuations(model, pairs: list[tuple[list[int], list[int]]],
                        batch_size: int) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax)
    per (context ids, continuation ids), from teacher-forced forwards of right-padded batches
    (the last `max_seq_len` tokens of each pair)."""
    was_training = model.training
    model.eval()
    limit = model.cfg.max_seq_len
    results: list[tuple[float, bool]] = []
    try:
        for b0 in range(0, len(pairs), batch_size):
            chunk = pairs[b0:b0 + batch_size]
            rows = [(ctx + cont)[-limit:] for ctx, cont in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long,
                              device=model.embed.weight.device)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.as_tensor(r)
            logp = torch.log_softmax(model(ids, mtp=False).logits.float(), -1)  # [b, w, V]
            for i, (ctx, cont) in enumerate(chunk):
                n, end = len(cont), len(rows[i])
                target = ids[i, end - n:end]                                      # [n]
                step = logp[i, end - n - 1:end - 1]                               # [n, V]
                picked = step.gather(-1, target[:, None])[:, 0]
                results.append((float(picked.sum()),
                                bool((step.argmax(-1) == target).all())))
    finally:
        model.train(was_training)
    return results


def generate_texts(model, tokenizer, requests: list[tuple[str, dict[str, Any]]],
                   batch_size: int, max_gen_toks: int) -> list[str]:
    """lm-eval's (context, gen_kwargs) requests through the engine."""
    from model.engine import Engine

    engine = Engine(model, max_batch=batch_size, eos_id=tokenizer.eos_token_id,
                    temperature=0.0, decode=lambda ids: tokenizer.decode(
                        ids, skip_special_tokens=False))
    stops, ids = [], []
    for context, kwargs in requests:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(context, add_special_tokens=False)
        prompt = prompt[-(model.cfg.max_seq_len - 1):]
        budget = min(int(kwargs.get("max_gen_toks", max_gen_toks)),
                     model.cfg.max_seq_len - len(prompt))
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0)) > 0
        ids.append(engine.add(prompt, max_new_tokens=budget, stop_strings=until or None,
                              temperature=float(kwargs["temperature"]) if sampled else 0.0))
        stops.append(until)
    out = engine.run()
    texts = []
    for rid, until in zip(ids, stops):
        text = tokenizer.decode(out[rid].tokens[0], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
        texts.append(text[:cut])
    return texts


def run_tasks(model, tokenizer, tasks: list[str], include: str | None = None,
              limit: float | None = None, num_fewshot: int | None = None,
              batch_size: int = 16, max_gen_toks: int = 256) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on `tasks` (lm-eval's names, or those of YAML task files in
    `include`); -> {task: {metric: value}}."""
    lm_eval, _ = import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm_eval_tasks: unknown task(s) {unknown}"
                         + (f" (none in lm-eval or in {include})" if include else
                            " (give lm_eval_include=FOLDER for your own task files)"))
    # one process evaluates everything (rank 0 of 1): a LOCAL_RANK left by a launcher would
    # make lm-eval treat this process as a tensor-parallel follower and return no results
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0"}):
        result = lm_eval.simple_evaluate(
            model=make_lm(model, tokenizer, batch_size, max_gen_toks), tasks=tasks,
            task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
            bootstrap_iters=0)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in result["results"].items()}
