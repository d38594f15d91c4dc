"""`python tests/distill/run_distill_scripted.py OVERRIDES...`: `python -m distill.onpolicy`
with the student's sampling replaced by a deterministic script (each response is the prompt's
last three tokens, then EOS), so that runs with different world sizes roll out the very same
samples and can be compared number for number (tests/distill/test_distill_e2e.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def scripted_generate(model, prompts, max_new_tokens=256, eos_id=None, **kw):
    import torch

    from model.generation import GenerationOutput

    tokens = [(list(p[-3:]) + [eos_id])[:max_new_tokens] for p in prompts]
    reasons = ["eos" if t[-1] == eos_id else "length" for t in tokens]
    logprobs = [torch.full((len(t),), -0.5) for t in tokens]
    return GenerationOutput(tokens, reasons, logprobs=logprobs, raw_logprobs=logprobs)


if __name__ == "__main__":
    import distill.onpolicy as entry

    real_make_task = entry.make_task

    def make_task(cfg, info, model_cfg, **prepared):
        task = real_make_task(cfg, info, model_cfg, **prepared)
        task.generate_fn = scripted_generate
        return task

    entry.make_task = make_task
    entry.main()
