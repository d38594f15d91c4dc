"""Evaluation harness: pass@1 (greedy), pass@k (T=1), format validity per verifiable domain.

    python -m train.evaluate ckpt=runs/tiny/checkpoints/step_00000100 domains=[strings,arith] n=200
    python -m train.evaluate ckpt=PATH domains=[calculator] options.calculator.schema=brief k=8
    python -m train.evaluate ckpt=PATH domains=[] lm_eval_tasks=[mmlu,gsm8k] [lm_eval_limit=100
                             num_fewshot=5 lm_eval_include=FOLDER]   # lm-evaluation-harness

Overrides are `key=value` (OmegaConf dotlist, typed by `EvalConfig`; no Hydra output directory
is created): `k` (pass@k from `samples` draws per item at `temperature`, default 4; `k=0` turns
the sampled pass off), `samples` (default k), `difficulty`, `split` (default test), `seed`,
`max_new_tokens` (per assistant turn), `max_tool_turns`, `batch_size`, `thinking_mode`,
`options.<domain>.<key>` (domain constructor options), `out=results.json`, `device`, `dtype`,
`tokenizer`; `lm_eval_tasks` (lm-evaluation-harness tasks through v4lab's model,
`train/lm_eval_adapter.py`; `lm_eval_include` a folder of your own task YAMLs, `lm_eval_limit`
items per task, `num_fewshot`). Prints a table and, with `out=`, writes the same numbers as
JSON (lm-eval's under `lm_eval`). Bad input (an
unknown domain or option, a missing checkpoint) is one `error: ...` line and exit status 2,
before any weights are read.

In-training evaluation calls `evaluate_domains(model, tokenizer, domains, n, ...)` (SFT/GRPO
tasks' `evaluate`): no printing, no rank logic of its own. Data parallel: pass `rank`/`world`
to evaluate a disjoint shard (item i goes to rank i % world); the counts are then summed over
the default process group when torch.distributed is initialised, so every rank returns the
global numbers. Every rank must call it (and, under EP, `generate`) the same number of times.

Items are distinct problems (`Domain.distinct`): when a split holds fewer than `n` (arith at
level 1 has 23 test problems), all of them are scored, the table's `n` says how many, and a
note says the request was capped; repeats would only re-weight the same problems.

Per domain: `pass@1` (greedy correct / evaluated), `pass@k` (mean over items of the unbiased
estimator 1 - C(s-c, k) / C(s, k) from s samples with c correct; Chen et al. 2021),
`format_valid` (greedy answers readable in the domain's format), `mean_response_tokens` (greedy
generated tokens; tool results excluded), `unparsable` (unreadable answers), `verifier_errors`
(verifier exceptions caught by `safe_verify`), `skipped` (prompts longer than the context), and
the greedy finish reasons. With k=1 the sampled estimate is `pass@1_sampled` (the greedy one
keeps `pass@1`). Rates are over evaluated (not skipped) items; None when there are none.
`examples=E` keeps the first E greedy transcripts per domain (the user's last message, the
completion, the reference answer, the score) under `examples`, for reports a person reads.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from data.domains import get_domain
from data.domains.base import SPLITS, Domain, Score
from model.generation import generate

from .config import _num
from .rollout import FINISH_REASONS, RolloutParams, RolloutResult, rollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact ints, one rounding


def solved(score: Score) -> bool:
    """Correct counts only with a readable answer (scores are format-gated)."""
    return bool(score.correct and score.format_valid)


# Summed over ranks; the rates are derived from them afterwards.
_COUNTS = ("items", "evaluated", "skipped", "correct", "format_valid", "unparsable",
           "verifier_errors", "response_tokens", "pass_k_sum", "sampled", "sampled_correct",
           "sampled_format_valid") + tuple(f"finish_{r}" for r in FINISH_REASONS)


def evaluate_domains(model, tokenizer, domains: Sequence[Domain | str], n: int, *,
                     split: str = "test", seed: int = 0, k: int = 0, samples: int | None = None,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     max_new_tokens: int = 64, max_tool_turns: int | None = None,
                     batch_size: int = 64, rank: int = 0, world: int = 1, examples: int = 0,
                     generate_fn: Callable = generate) -> dict[str, Any]:
    """Scores `n` items of `split` per domain (module docstring). Returns

        {"domains": {name: {"pass@1", "pass@k" (when k), "format_valid", ...}},
         "settings": {...}, "stats": {"generated_tokens", "seconds", ...},
         "examples": {name: [{"prompt", "completion", "answer", "correct", "reason"}]}}

    `domains`: Domain objects or names (built with default options). `k=0`: greedy only.
    `generate_fn`: `model.generation.generate` or a stand-in with its signature (tests)."""
    samples = k if samples is None else samples
    if k < 0 or (k and samples < k):
        raise ValueError(f"evaluate: k={k}, samples={samples}: need k >= 0 and samples >= k")
    if split not in SPLITS:
        raise ValueError(f"evaluate: split={split!r}: choose one of {SPLITS}")
    if not 0 <= rank < world:
        raise ValueError(f"evaluate: rank={rank}, world={world}: need 0 <= rank < world")
    built = [get_domain(d) if isinstance(d, str) else d for d in domains]
    names = [d.name for d in built]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: domains {names}: each domain at most once")
    greedy = RolloutParams(temperature=0.0, max_new_tokens=max_new_tokens, n=1, seed=seed,
                           batch_size=batch_size, max_tool_turns=max_tool_turns)
    sampled = RolloutParams(temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new_tokens, n=max(samples, 1), seed=seed,
                            batch_size=batch_size, max_tool_turns=max_tool_turns)
    greedy.validate(), sampled.validate()
    counts: dict[str, dict[str, float]] = {}
    stats = {"generated_tokens": 0.0, "generate_seconds": 0.0, "seconds": 0.0}
    shown: dict[str, list[dict[str, Any]]] = {}
    capped: dict[str, int] = {}  # distinct items per domain (< n: the split has no more)
    for domain in built:
        unique = domain.distinct(split, n, seed)  # never the same problem twice
        capped[domain.name] = len(unique)
        items = [item for i, item in enumerate(unique) if i % world == rank]
        requests = [(domain, item) for item in items]
        c = dict.fromkeys(_COUNTS, 0.0)
        c["items"] = len(items)
        if requests:
            g = rollout(model, tokenizer, requests, greedy, generate_fn=generate_fn)
            _count_greedy(c, g)
            _add_stats(stats, g)
            shown[domain.name] = [_example(items[s.request], s) for s in g.samples[:examples]]
            if k:
                s = rollout(model, tokenizer, requests, sampled, generate_fn=generate_fn)
                _count_sampled(c, s, samples, k)
                _add_stats(stats, s)
        counts[domain.name] = c
    counts = _all_reduce(counts, world)
    return {"domains": {name: _rates(c, k) for name, c in counts.items()},
            "settings": {"n": n, "split": split, "seed": seed, "k": k, "samples": samples,
                         "temperature": temperature, "top_p": top_p, "top_k": top_k,
                         "max_new_tokens": max_new_tokens, "max_tool_turns": max_tool_turns,
                         "difficulty": {d.name: d.difficulty for d in built},
                         "world": world, "distinct_items": capped},
            "stats": stats, "examples": shown}


def _example(item, sample) -> dict[str, Any]:
    """One greedy transcript as a person reads it (rank-local: no reduction)."""
    user = [m for m in item.prompt_messages if m.get("role") == "user"]
    return {"prompt": str(user[-1].get("content", "")) if user else "",
            "completion": sample.text, "answer": item.answer,
            "correct": bool(solved(sample.score)), "reason": sample.score.reason}


def stage_evaluation(model, tokenizer, domains: Sequence[Domain], n: int, max_new_tokens: int,
                     cfg, info, step: int):
    """A training stage's domain evaluation (SFT, GRPO, distillation): greedy pass@1,
    format-valid rate and response length on `n` test items per domain, as an `EvalResult`.
    Items are sharded over data-parallel ranks; under expert parallelism or ZeRO-3 every rank
    evaluates every item (each forward is collective, and identical weights decode the same
    greedy tokens, so all ranks run the same number of generation rounds)."""
    from .dist import forwards_are_collective
    from .task import EvalResult

    sharded = not forwards_are_collective(cfg)
    result = evaluate_domains(model, tokenizer, list(domains), n, seed=cfg.seed,
                              max_new_tokens=max_new_tokens,
                              batch_size=max(1, cfg.data.micro_batch * 8),
                              rank=info.rank if sharded else 0, world=info.world if sharded else 1)
    return EvalResult(flat_metrics(result), [f"step {step}: domain evaluation (test split, "
                                             f"greedy)\n" + format_table(result),
                                             *capped_notes(result)])


def _count_greedy(c: dict[str, float], result: RolloutResult) -> None:
    c["skipped"] += len(result.skipped)
    for s in result.samples:
        c["evaluated"] += 1
        c["correct"] += solved(s.score)
        c["format_valid"] += s.score.format_valid
        c["unparsable"] += not s.score.format_valid and s.score.error is None
        c["verifier_errors"] += s.score.error is not None
        c["response_tokens"] += s.generated_tokens
        c[f"finish_{s.finish}"] += 1


def _count_sampled(c: dict[str, float], result: RolloutResult, samples: int, k: int) -> None:
    correct: dict[int, int] = {}
    for s in result.samples:
        correct[s.request] = correct.get(s.request, 0) + int(solved(s.score))
        c["sampled"] += 1
        c["sampled_correct"] += solved(s.score)
        c["sampled_format_valid"] += s.score.format_valid
    c["pass_k_sum"] += sum(pass_at_k(samples, n_ok, k) for n_ok in correct.values())


def _add_stats(stats: dict[str, float], result: RolloutResult) -> None:
    for key in stats:
        stats[key] += result.stats.get(key, 0.0)


def _all_reduce(counts: dict[str, dict[str, float]], world: int):
    """Sums every count over the default group (when initialised and sharded)."""
    import torch
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return counts
    names = list(counts)
    flat = torch.tensor([[counts[d][key] for key in _COUNTS] for d in names],
                        dtype=torch.float64)
    dist.all_reduce(flat)
    return {d: dict(zip(_COUNTS, row)) for d, row in zip(names, flat.tolist())}


def _rates(c: dict[str, float], k: int) -> dict[str, Any]:
    def rate(num: str, den: str) -> float | None:
        return c[num] / c[den] if c[den] else None

    out: dict[str, Any] = {
        "n": int(c["items"]), "evaluated": int(c["evaluated"]), "skipped": int(c["skipped"]),
        "pass@1": rate("correct", "evaluated"), "format_valid": rate("format_valid", "evaluated"),
        "mean_response_tokens": rate("response_tokens", "evaluated"),
        "unparsable": int(c["unparsable"]), "verifier_errors": int(c["verifier_errors"]),
        "finish": {r: int(c[f"finish_{r}"]) for r in FINISH_REASONS if c[f"finish_{r}"]},
    }
    if k:
        out[pass_k_key(k)] = c["pass_k_sum"] / c["evaluated"] if c["evaluated"] else None
        out["sampled_accuracy"] = rate("sampled_correct", "sampled")
        out["sampled_format_valid"] = rate("sampled_format_valid", "sampled")
    return out


def capped_notes(result: dict[str, Any]) -> list[str]:
    """One line per domain whose split has fewer distinct items than the `n` asked for."""
    st = result["settings"]
    return [f"note: {name} (difficulty {st['difficulty'][name]}) has {have} distinct "
            f"{st['split']} items; all {have} are scored, not n={st['n']}"
            for name, have in st["distinct_items"].items() if have < st["n"]]


def pass_k_key(k: int) -> str:
    """The sampled metric's name: `pass@k`, or `pass@1_sampled` beside the greedy `pass@1`."""
    return f"pass@{k}" if k > 1 else "pass@1_sampled"


def flat_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """`{eval/<domain>/<metric>: value}` of the numeric rates, for a trainer's metrics log."""
    flat = {}
    for name, row in result["domains"].items():
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{name}/{key}"] = float(value)
    return flat


def format_table(result: dict[str, Any]) -> str:
    k = result["settings"]["k"]
    cols = ["pass@1"] + ([pass_k_key(k)] if k else []) + ["format_valid", "mean_response_tokens",
                                                        "unparsable", "verifier_errors",
                                                        "evaluated", "skipped"]
    heads = ["domain"] + [c.replace("mean_response_tokens", "mean_len") for c in cols]
    rows = [[name] + [_cell(row.get(c)) for c in cols]
            for name, row in result["domains"].items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, rows)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---- command line ----------------------------------------------------------------------------
@dataclass
class EvalConfig:
    ckpt: Optional[str] = None
    domains: List[str] = field(default_factory=lambda: ["strings"])
    n: int = _num(200, ">= 1")
    k: int = _num(4, ">= 0")
    samples: Optional[int] = _num(None, ">= 1")  # draws per item for pass@k; None = k
    temperature: float = _num(1.0, ">= 0")
    top_p: float = _num(1.0, "(0, 1]")
    top_k: int = _num(0, ">= 0")
    difficulty: Optional[int] = None  # every domain; None = each domain's default
    thinking_mode: str = "chat"
    options: Dict[str, Any] = field(default_factory=dict)  # options.<domain>.<key>=value
    split: str = "test"
    seed: int = 0
    max_new_tokens: int = _num(64, ">= 1")
    max_tool_turns: Optional[int] = _num(None, ">= 0")
    batch_size: int = _num(64, ">= 1")
    examples: int = _num(0, ">= 0")  # greedy transcripts kept per domain in the JSON
    out: Optional[str] = None
    device: str = "auto"
    dtype: Optional[str] = None
    tokenizer: Optional[str] = None
    lm_eval_tasks: List[str] = field(default_factory=list)
    lm_eval_include: Optional[str] = None
    lm_eval_limit: Optional[float] = _num(None, "> 0")
    num_fewshot: Optional[int] = _num(None, ">= 0")


def parse_config(argv: list[str]) -> EvalConfig:
    """Typed `key=value` overrides over EvalConfig (`train.cli.parse_cli`: every bad key at
    once, `--help`), then the rules between keys; ValueError naming them."""
    from .cli import parse_cli

    cfg = parse_cli(EvalConfig, argv, __doc__)
    problems = []
    if cfg.ckpt is None:
        problems.append("ckpt=PATH is required")
    if cfg.k and cfg.samples is not None and cfg.samples < cfg.k:
        problems.append(f"samples={cfg.samples}: must be >= k={cfg.k}")
    unknown = set(cfg.options) - set(cfg.domains)
    if unknown:
        problems.append(f"options.{sorted(unknown)[0]}: not one of domains={cfg.domains}")
    if problems:
        raise ValueError("\n  ".join(problems))
    return cfg


def build_domains(cfg: EvalConfig) -> list[Domain]:
    """The domains to evaluate, with their options; errors name the domain (before weights)."""
    if not cfg.domains and not cfg.lm_eval_tasks:
        raise ValueError("domains=[]: name at least one domain (or lm_eval_tasks)")
    built = []
    for name in cfg.domains:
        options = dict(cfg.options.get(name) or {})
        options.setdefault("thinking_mode", cfg.thinking_mode)
        if cfg.difficulty is not None:
            options.setdefault("difficulty", cfg.difficulty)
        built.append(get_domain(name, **options))
    return built


def main(argv: list[str] | None = None) -> int:
    from .cli import fail
    from .loading import checkpoint_dir, load_model_and_tokenizer, tokenizer_path

    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        domains = build_domains(cfg)
        checkpoint_dir(cfg.ckpt), tokenizer_path(cfg.ckpt, cfg.tokenizer)  # before any weights
        if cfg.lm_eval_tasks:
            from .lm_eval_adapter import import_lm_eval

            import_lm_eval()  # the extra, before any weights
        model, tokenizer = load_model_and_tokenizer(cfg.ckpt, cfg.tokenizer, cfg.device,
                                                    cfg.dtype)
        result = run_domains(cfg, model, tokenizer, domains)
        if cfg.lm_eval_tasks:
            from .lm_eval_adapter import run_tasks

            result["lm_eval"] = run_tasks(model, tokenizer, cfg.lm_eval_tasks,
                                          cfg.lm_eval_include, cfg.lm_eval_limit,
                                          cfg.num_fewshot, cfg.batch_size, cfg.max_new_tokens)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return fail(str(e))
    report(cfg, result)
    return 0


def run_domains(cfg: EvalConfig, model, tokenizer, domains: list[Domain]) -> dict[str, Any]:
    if not domains:
        return {"settings": {}, "domains": {}, "stats": {}}
    return evaluate_domains(model, tokenizer, domains, cfg.n, split=cfg.split, seed=cfg.seed,
                            k=cfg.k, samples=cfg.samples, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens,
                            max_tool_turns=cfg.max_tool_turns, batch_size=cfg.batch_size,
                            examples=cfg.examples)


def report(cfg: EvalConfig, result: dict[str, Any]) -> None:
    result["settings"]["ckpt"] = cfg.ckpt
    if result["domains"]:
        for note in capped_notes(result):
            sys.stderr.write(note + "\n")
        print(format_table(result))
        s = result["stats"]
        print(f"generated {s['generated_tokens']:.0f} tokens in {s['seconds']:.1f}s "
              f"({s['generated_tokens'] / max(s['generate_seconds'], 1e-9):.1f} tok/s in "
              f"generate)")
    for task, metrics in result.get("lm_eval", {}).items():
        print(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if cfg.out:
        _write_json(cfg.out, result)
        print(f"wrote {cfg.out}")


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a results file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
