"""Pre-train a DeepSeek-V4 model.

    deepspeed train/pretrain.py                       # tiny preset on the default corpus (CPU ok)
    deepspeed --num_gpus 8 train/pretrain.py conf=flash parallel.ep_size=8
    torchrun --nproc_per_node 2 train/pretrain.py steps=50
    python train/pretrain.py dry_run=true conf=pro world_size=512

Everything else (the step loop, checkpoints, logging) is the shared trainer core in `train/`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.dist import strip_launcher_args  # noqa: E402

sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]

import hydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from train.config import TrainConfig, register  # noqa: E402

register()
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pretrain")
def main(cfg: TrainConfig) -> None:
    from model.config import get_config
    from train.config import ConfigError, validate_config
    from train.dist import init_distributed
    from train.plan import make_plan

    model_cfg = get_config(cfg.model.preset, **OmegaConf.to_container(cfg.model.overrides))
    world = (cfg.world_size if cfg.dry_run else None) or int(os.environ.get("WORLD_SIZE", "1"))
    try:  # every key's range and the rules between keys, before any data or model work
        validate_config(cfg, world, model_cfg)
    except ConfigError as e:
        # the list of bad keys is the message (once, from rank 0); no traceback
        raise SystemExit(f"{e}" if int(os.environ.get("RANK", "0")) == 0 else 1) from None
    if cfg.dry_run:
        bf16 = cfg.dtype != "fp32"
        plan = make_plan(model_cfg, world, cfg.parallel.ep_size, cfg.data.micro_batch,
                         cfg.data.seq_len, cfg.batch.global_batch, bf16,
                         cfg.activation_checkpointing)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dry run: conf={cfg.run_name} ({cfg.model.preset})\n{plan.format()}")
        return

    from train.checkpoint import CheckpointError
    from train.init import adopt_tokenizer
    from train.task import PretrainTask
    from train.trainer import Trainer

    adopt_tokenizer(cfg)  # init_from without data.tokenizer: the checkpoint's tokenizer
    info = init_distributed(cfg.device)
    if info.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    try:  # fit and resume checks before any data work
        trainer = Trainer(cfg, info, model_cfg)
    except CheckpointError as e:
        # the message names the file and the way out (once, from rank 0)
        raise SystemExit(f"{e}" if info.is_main else 1) from None
    trainer.run(PretrainTask(cfg, info, model_cfg))


if __name__ == "__main__":
    main()
