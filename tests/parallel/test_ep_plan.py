"""EP config validation (clear errors naming the field, before allocation) and the planner's EP
numbers used for the sizing table in train/README.md."""

import pytest

from model.config import get_config
from tests.parallel.harness import small_config
from train import expert_parallel as ep
from train.plan import Links, dispatch_bytes_per_token, ep_table, make_plan


@pytest.mark.parametrize("world,size,message", [
    (4, 3, "parallel.ep_size=3 must divide n_routed_experts=8"),
    (6, 4, "parallel.ep_size=4 must divide the world size 6"),
    (2, 0, "parallel.ep_size=0: must be >= 1"),
])
def test_validate_names_the_field(world, size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ep.validate(small_config(), world, size)


def test_ep_with_an_unknown_zero_stage_is_refused():
    with pytest.raises(ValueError, match="ZeRO stages 0 to 3"):
        ep.validate(small_config(), 4, 2, zero_stage=4)
    ep.validate(small_config(), 4, 2, zero_stage=3)


def test_plan_expert_memory_and_dispatch_bytes():
    cfg = get_config("flash")
    p8, p16 = (make_plan(cfg, e, e, 1, 4096, e, True, "block") for e in (8, 16))
    assert p8.expert_params_per_rank == 2 * p16.expert_params_per_rank
    assert p8.dispatch_bytes == pytest.approx(6 * (4096 * 4 + 4) * 7 / 8)
    assert dispatch_bytes_per_token(cfg, 1) == 0
    table = ep_table(("flash",), (8, 64)).splitlines()
    assert len(table) == 4 and "| flash | 64 | 4 |" in table[-1]


def test_communication_terms_by_hand():
    """4 ranks, EP 2, nodes of 2 GPUs, bf16, block checkpointing: dense gradients ring
    all-reduced over 4 ranks on 2 nodes (network, 2·3/4 of the bytes), expert gradients over the
    2 ranks holding the same experts (2 apart: different nodes), Muon's owners sending 3/4 of
    the matrices, and an all-to-all that stays inside the node (EP 2 fits in one)."""
    cfg = small_config()
    links = Links(gpus_per_node=2, intra_node=100.0, inter_node=10.0)
    plan = make_plan(cfg, 4, 2, 2, 64, 16, True, "block", links=links)
    terms = {t.name: t for t in plan.comm}
    dense = plan.params_per_rank - plan.expert_params_per_rank
    grad = terms["dense grad all-reduce"]
    assert grad.bytes == pytest.approx(dense * 2 * 2 * 3 / 4) and grad.link == "network"
    assert grad.seconds == pytest.approx(grad.bytes / 10.0)
    expert = terms["expert grad all-reduce"]
    assert expert.bytes == pytest.approx(plan.expert_params_per_rank * 2 * 2 * 1 / 2)
    assert expert.link == "network"
    tokens = 2 * 64 * plan.grad_accum  # micro-batch x seq x accumulation (2)
    a2a = terms["moe all-to-all"]
    assert a2a.bytes == pytest.approx(tokens * (cfg.n_layers + cfg.n_mtp_layers) * 3
                                      * dispatch_bytes_per_token(cfg, 2, 2))
    assert a2a.link == "nvlink" and a2a.seconds == pytest.approx(a2a.bytes / 100.0)
    assert "dominant: " in plan.format()
    alone = make_plan(cfg, 1, 1, 2, 64, 2, True, "off")
    assert all(t.bytes == 0 and t.seconds == 0 for t in alone.comm)
