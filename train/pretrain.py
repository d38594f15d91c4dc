"""Pre-train a DeepSeek-V4 model.

    deepspeed train/pretrain.py                       # tiny preset on the default corpus (CPU ok)
    deepspeed --num_gpus 8 train/pretrain.py conf=flash parallel.ep_size=8
    torchrun --nproc_per_node 2 train/pretrain.py steps=50
    python train/pretrain.py dry_run=true conf=pro world_size=512

Everything else (the step loop, checkpoints, logging) is the shared trainer core in `train/`;
the stage itself is `train/pretrain_task.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_task(cfg, info, model_cfg):
    from train.pretrain_task import PretrainTask

    return PretrainTask(cfg, info, model_cfg)


if __name__ == "__main__":
    from train.stage import Stage

    Stage("pretrain", make_task).main()
