"""The pretraining launcher end to end, in real processes on the default corpus: learning,
checkpoints, exact resume (1 process bitwise; 2 processes trained on two simulated nodes under the deepspeed launcher and resumed on one), torchrun across two simulated nodes, SIGTERM,
micro-batching invariance of the router-bias update, non-finite step skipping, fault exit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.weights import read_weights

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1"}
# tiny preset, short sequences: every step is cheap, the recipe's phases all occur. AdamW: on
# this model and batch Muon's Newton-Schulz costs 3 s of a 5 s CPU step, and these tests are
# about the launcher and the trainer; the tests that pass MUON run the default optimizer end to
# end (its sharded state resumed exactly, 1 and 2 processes)
MUON = "optim.name=muon"
ZERO2 = "parallel.zero_stage=2"
FAST = ["optim.name=adamw", "data.seq_len=128", "data.micro_batch=2", "batch.global_batch=4",
        "data.default_max_files=120", "logging.progress=false", "logging.wandb.mode=disabled",
        "logging.eval_every=0", "logging.sample_tokens=4", "recipe.csa_dense_until=4",
        "recipe.indexer_warmup_steps=2", "schedule.warmup_steps=2", "schedule.decay_steps=4"]


def run(args, run_dir, cache_dir, launcher="python", timeout=600, env=None, check=True):
    if launcher.endswith("_2nodes"):
        return run_two_nodes(args, run_dir, cache_dir, launcher.removesuffix("_2nodes"), timeout)
    cmd = {"python": [sys.executable, "train/pretrain.py"],
           "deepspeed2": ["deepspeed", "--num_gpus", "2", "--master_port", str(_port()),
                          "train/pretrain.py"],
           "torchrun2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(_port()), "train/pretrain.py"]}[launcher]
    out = subprocess.run([*cmd, *FAST, f"run_dir={run_dir}", f"data.cache_dir={cache_dir}",
                          *args], cwd=REPO, env=env or ENV, capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def run_two_nodes(args, run_dir, cache_dir, launcher: str, timeout: int):
    """Two "nodes" of one process each, launched as on a cluster: one launcher per node with its
    node rank and the first node as rendezvous (torchrun --nnodes 2; deepspeed with a hostfile
    and --no_ssh, which starts only the given node's ranks), sharing the run directory as nodes
    share a filesystem. Both launchers must exit 0."""
    port = str(_port())
    hostfile = Path(run_dir).parent / f"{Path(run_dir).name}_hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    procs = []
    for node in (0, 1):
        cmd = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                            "--nproc_per_node", "1", "--node_rank", str(node),
                            "--master_addr", "127.0.0.1", "--master_port", port],
               "deepspeed": ["deepspeed", "--hostfile", str(hostfile), "--no_ssh",
                             "--node_rank", str(node), "--master_addr", "127.0.0.1",
                             "--master_port", port]}[launcher]
        procs.append(subprocess.Popen([*cmd, "train/pretrain.py", *FAST, f"run_dir={run_dir}",
                                       f"data.cache_dir={cache_dir}", *args], cwd=REPO, env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}:\n{out[-5000:]}"
    return outs


def _port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_single_process_learns_checkpoints_and_resumes_bitwise(tmp_path, cache_dir):
    a = tmp_path / "a"
    run(["steps=8", "checkpoint.every=4", "logging.eval_every=8", MUON], a, cache_dir)
    full = losses(a)
    assert sorted(full) == list(range(1, 9))
    assert (a / "checkpoints" / "step_00000004" / "model" / "model.safetensors").is_file()
    assert (a / "loss_curve.png").is_file()
    metrics = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in m for m in metrics)
    # resume from step 4 in a fresh run directory holding only that checkpoint
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_00000004", b / "checkpoints" / "step_00000004")
    run(["steps=8", "checkpoint.every=4", "logging.eval_every=8", MUON], b, cache_dir)
    resumed = losses(b)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # bitwise


def test_two_processes_deepspeed_launcher_learn_and_resume(tmp_path, cache_dir):
    """Trained on two simulated nodes (hostfile, --no_ssh, one launcher per node) with
    whole-matrix ZeRO-2 (gradients, optimizer state on their owner rank), resumed on one node
    with two processes: the same ranks and owners, so the continued losses are the same."""
    a = tmp_path / "a"
    run(["steps=16", "checkpoint.every=8", "optim.lr=3e-3", MUON, ZERO2], a, cache_dir,
        "deepspeed_2nodes")
    full = losses(a)
    assert sorted(full) == list(range(1, 17))
    first, last = sum(full[s] for s in range(1, 5)) / 4, sum(full[s] for s in range(13, 17)) / 4
    assert last < first - 1.0, (first, last)
    ckpt = a / "checkpoints" / "step_00000008"
    assert {p.name for p in ckpt.iterdir()} >= {"model", "optimizer_rank0.pt",
                                                "optimizer_rank1.pt", "trainer_rank1.pt"}
    shards = [torch.load(ckpt / f"optimizer_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(s["muon_shard"]["zero_stage"] == 2 for s in shards)
    owned = [set(s["state"]) for s in shards]    # every parameter's state on one rank only
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert len(owned[0] | owned[1]) == sum(len(g["params"]) for g in shards[0]["param_groups"])
    weights = read_weights(ckpt / "model")
    assert "layers.1.ffn.gate.bias" in weights and weights["layers.1.ffn.gate.bias"].abs().sum() > 0
    shutil.rmtree(a / "checkpoints" / "step_00000016")
    (a / "metrics.jsonl").unlink()
    run(["steps=16", "checkpoint.every=8", "optim.lr=3e-3", MUON, ZERO2], a, cache_dir,
        "deepspeed2")
    resumed = losses(a)
    assert sorted(resumed) == list(range(9, 17))
    for step in resumed:
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # bitwise


def test_torchrun_launcher_two_nodes(tmp_path, cache_dir):
    """`torchrun --nnodes 2 --node_rank R --master_addr ...` once per node, one process each."""
    outs = run(["steps=2", "checkpoint.every=2"], tmp_path, cache_dir, "torchrun_2nodes")
    assert sorted(losses(tmp_path)) == [1, 2]
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert {"trainer_rank0.pt", "trainer_rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    assert len(outs) == 2


def test_zero3_two_processes_evaluate_sample_and_save(tmp_path, cache_dir):
    """ZeRO-3 at EP 1 (`optim.weight_sharding`): every forward gathers each block's weights over
    both ranks, so the held-out loss, the greedy sample (printed by rank 0, run by both) and the
    consolidated checkpoint need both ranks in step; a rank skipping one of them would leave the
    other waiting in a gather until the timeout. The run finishes, evaluates, samples, and its
    checkpoint holds whole weights that a single process resumes from."""
    a = tmp_path / "a"
    out = run(["steps=2", "checkpoint.every=2", "logging.eval_every=2", "parallel.zero_stage=3"],
              a, cache_dir, "torchrun2", timeout=400)
    assert "sample:" in out.stdout + out.stderr
    metrics = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in m for m in metrics)
    weights = read_weights(a / "checkpoints" / "step_00000002" / "model")
    assert all(w.abs().sum() > 0 for k, w in weights.items() if k.endswith("attn.wq_a.weight"))
    run(["steps=3", "checkpoint.every=3", "logging.eval_every=0"], a, cache_dir)  # 1 process
    assert sorted(losses(a)) == [1, 2, 3]


def test_router_bias_update_same_for_one_and_four_micro_batches(tmp_path, cache_dir):
    biases = []
    for micro in (8, 2):
        d = tmp_path / f"m{micro}"
        run(["steps=1", f"data.micro_batch={micro}", "batch.global_batch=8", "data.prefetch=0"],
            d, cache_dir)
        w = load_file(str(d / "checkpoints" / "step_00000001" / "model" / "model.safetensors"))
        biases.append({k: v for k, v in w.items() if k.endswith("ffn.gate.bias")})
    assert biases[0].keys() == biases[1].keys() and biases[0]
    for k in biases[0]:
        assert biases[0][k].abs().sum() > 0
        torch.testing.assert_close(biases[0][k], biases[1][k])


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, cache_dir):
    cmd = [sys.executable, "train/pretrain.py", *FAST, "steps=1000", "checkpoint.every=0",
           f"run_dir={tmp_path}", f"data.cache_dir={cache_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(losses(tmp_path)) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # stopped, not finished
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and not saved[0].name.endswith(".tmp")
    step = int(saved[0].name.split("_")[1])
    assert step >= 2
    run([f"steps={step + 1}", "checkpoint.every=0"], tmp_path, cache_dir)
    assert max(losses(tmp_path)) == step + 1


def test_non_finite_steps_are_skipped_then_stop(tmp_path, cache_dir):
    env = {**ENV, "V4LAB_FAULT_NAN_STEPS": "2"}  # fault injection: NaN loss at step 2
    run(["steps=3"], tmp_path / "skip", cache_dir, env=env)
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 1, 1]
    env = {**ENV, "V4LAB_FAULT_NAN_STEPS": "2,3,4"}
    out = run(["steps=6", "max_bad_steps=3", "checkpoint.every=1"], tmp_path / "stop", cache_dir,
              env=env, check=False)
    assert out.returncode != 0 and "3 non-finite steps in a row" in out.stdout + out.stderr
    kept = sorted((tmp_path / "stop" / "checkpoints").glob("step_*"))
    assert [p.name for p in kept][-1] == "step_00000001"  # the last good one, intact


def test_error_in_one_rank_stops_the_job(tmp_path, cache_dir):
    env = {**ENV, "V4LAB_FAULT_RAISE_RANK": "1"}
    start = time.time()
    out = run(["steps=50"], tmp_path, cache_dir, "deepspeed2", env=env, check=False, timeout=300)
    assert out.returncode != 0
    assert "injected fault on rank 1" in out.stdout + out.stderr
    assert time.time() - start < 240
