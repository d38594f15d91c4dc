"""Supervised fine-tuning of a domain expert (or a mixed-domain model).

    deepspeed train/sft.py init_from=runs/tiny/checkpoints/step_00000100 sft.domains=[strings]
    python train/sft.py init_from=... sft.domains=[strings,arith:2] run_name=sft_mix
    python train/sft.py init_from=... sft.files=[my_chats.jsonl] sft.domains=[]
    deepspeed --num_gpus 2 train/sft.py ...;  torchrun --nproc_per_node 2 train/sft.py ...

Same trainer core, checkpoints and resume as pre-training (`train/`); the stage is
`train/sft_task.py`. The tokenizer is the starting checkpoint's (`init_from`), or `data.tokenizer`.
Checkpoints load in `generate.py`, `init_from` and `python -m train.evaluate`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tokenizer_for(cfg) -> str:
    from train.init import stage_tokenizer

    return stage_tokenizer(cfg, "SFT")


def pre_checks(cfg, model_cfg, world: int) -> dict:
    from train.sft_task import build_domains

    from train.init import inspect

    build_domains(cfg.sft)  # unknown domains, bad options, missing files
    if cfg.init_from:
        inspect(cfg.init_from)  # a readable checkpoint (headers only), named when it is not
    else:
        print("warning: no init_from: SFT starts from random weights", file=sys.stderr)
    return {"tokenizer_file": tokenizer_for(cfg)}


def make_task(cfg, info, model_cfg, tokenizer_file: str | None = None):
    from train.sft_task import SFTTask

    return SFTTask(cfg, info, model_cfg, tokenizer_file or tokenizer_for(cfg))


if __name__ == "__main__":
    from train.stage import Stage

    Stage("sft", make_task, checks=pre_checks).main()
