"""EP config validation (clear errors naming the field, before allocation) and the planner's EP
numbers used for the sizing table in train/README.md."""

import pytest

from model.config import get_config
from tests.parallel.harness import small_config
from train import expert_parallel as ep
from train.plan import dispatch_bytes_per_token, ep_table, make_plan


@pytest.mark.parametrize("world,size,message", [
    (4, 3, "parallel.ep_size=3 must divide n_routed_experts=8"),
    (6, 4, "parallel.ep_size=4 must divide the world size 6"),
    (2, 0, "parallel.ep_size=0: must be >= 1"),
])
def test_validate_names_the_field(world, size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ep.validate(small_config(), world, size)


def test_ep_with_zero_stage_1_is_refused():
    with pytest.raises(ValueError, match="ZeRO stage 0 only"):
        ep.validate(small_config(), 4, 2, zero_stage=1)


def test_plan_expert_memory_and_dispatch_bytes():
    cfg = get_config("flash")
    p8, p16 = (make_plan(cfg, e, e, 1, 4096, e, True, "block") for e in (8, 16))
    assert p8.expert_params_per_rank == 2 * p16.expert_params_per_rank
    assert p8.dispatch_bytes == pytest.approx(6 * (4096 * 4 + 4) * 7 / 8)
    assert dispatch_bytes_per_token(cfg, 1) == 0
    table = ep_table(("flash",), (8, 64)).splitlines()
    assert len(table) == 4 and "| flash | 64 | 4 |" in table[-1]
