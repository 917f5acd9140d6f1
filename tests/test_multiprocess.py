"""Several CPU processes training one tiny Relformer end where one process on the whole batch ends: Trainer's DDP
started by torchrun and by `accelerate launch --multi_gpu`, DeepSpeed ZeRO-2 and ZeRO-3 with Trainer under torchrun
(the `deepspeed` extra), and FSDP2 (`fully_shard`).

On a machine without an accelerator:
- `accelerate launch --cpu --num_processes 2` (or a MULTI_CPU config) starts ONE process unless it is given an MPI
  hostfile (`--mpirun_hostfile`, with mpirun installed): `--cpu` always takes accelerate's simple launcher. Its
  torchrun launcher is `--multi_gpu`, whatever the device.
- Under torchrun, Trainer forms a process group only with `use_cpu=True` (or ACCELERATE_USE_CPU=true): otherwise
  each process trains alone. Every test here checks that the processes saw a world of 2.
- DeepSpeed needs the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); plain
  `python` wants mpi4py."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import assert_same_weights

from helpers import REPO_ROOT, tiny_lm

TESTS_DIR = str(REPO_ROOT / "tests")

# One Trainer run of 3 SGD steps on the 8 equal-length examples (one step = the whole dataset in both set-ups: no
# sampler-order difference); saves each rank's final weights (ZeRO-3: gathered on rank 0), logged losses and world.
TRAIN_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from transformers import Trainer
from helpers import tiny_lm
from test_training import TokenDataset, arguments
output, per_device, options = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
if "deepspeed" in options:
    # DeepSpeed compiles its shared-memory all-reduce (inference's, unused by ZeRO training) on first use: ~90 s of
    # C++ on 2 cores. Marked unavailable, its communication falls back to torch.distributed (gloo).
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
model = tiny_lm("relative")
args = arguments(output, per_device_train_batch_size=per_device, max_steps=3, **options)
trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(count=8, ragged=False))
trainer.train()
weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
result = {"weights": weights, "losses": losses, "world_size": args.world_size}
torch.save(result, f"{output}/rank{args.process_index}.pt")
"""

ZERO = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
ZERO_2 = ZERO | {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
ZERO_3 = ZERO | {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "zero_allow_untested_optimizer": True,  # Trainer's plain SGD
}


def free_port() -> int:
    """A free port for the rendezvous (torchrun's port 0 waits forever)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], work_dir: Path, **env) -> None:
    """Runs `command` (fails with its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work_dir, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]


def train(launcher: list[str], output: Path, per_device: int, env=None, **options) -> list[dict]:
    """Runs TRAIN_SCRIPT under `launcher` (a command prefix: [sys.executable] for one process); each rank's result."""
    script = output.parent / "train.py"
    script.write_text(TRAIN_SCRIPT)
    output.mkdir()
    command = [*launcher, str(script), TESTS_DIR, str(output), str(per_device), json.dumps(options)]
    run(command, output, **env or {})
    return [torch.load(path, weights_only=True) for path in sorted(output.glob("rank*.pt"))]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The reference: one process, batch 8 (the whole dataset) per step."""
    (result,) = train([sys.executable], tmp_path_factory.mktemp("single") / "out", per_device=8)
    initial = tiny_lm("relative").state_dict()
    assert max(float((result["weights"][n] - initial[n]).abs().max()) for n in initial) > 1e-3  # it trained
    assert result["world_size"] == 1 and len(result["losses"]) == 3
    return result


def assert_matches_one_process(ranks: list[dict], reference: dict, gathered_on_rank0_only: bool = False) -> None:
    assert [rank["world_size"] for rank in ranks] == [2, 2]  # one process group of two, not two lone processes
    for rank in ranks:
        assert rank["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
    compared = ranks[:1] if gathered_on_rank0_only else ranks
    for rank in compared:
        assert sorted(rank["weights"]) == sorted(reference["weights"])
        assert_same_weights(rank["weights"], reference["weights"], atol=1e-5)
    if not gathered_on_rank0_only:
        for name, tensor in ranks[0]["weights"].items():
            assert torch.equal(tensor, ranks[1]["weights"][name]), name


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_data_parallel_training_matches_one_process(launcher, one_process, tmp_path):
    """Two processes of batch 4 (gloo) end with the weights and losses of one process of batch 8. `accelerate launch
    --multi_gpu` runs torchrun, whose processes Trainer (use_cpu=True) joins with gloo on a machine without GPUs."""
    env = {}
    if launcher == "torchrun":
        command = torchrun()
    else:
        env = {"HF_HOME": str(tmp_path / "hf")}  # no default accelerate config of this machine's user
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
        command += ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
        command += [f"--main_process_port={free_port()}"]
    ranks = train(command, tmp_path / "out", per_device=4, env=env, ddp_backend="gloo")
    assert_matches_one_process(ranks, one_process)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (the `deepspeed` extra)
# ---------------------------------------------------------------------------------------------------------------

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (pip install -e '.[deepspeed]')"
)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_training_matches_one_process(stage, one_process, tmp_path):
    """Trainer(deepspeed=config) under torchrun: ZeRO-2 (optimizer state and gradients sharded) and ZeRO-3
    (parameters too; each attention is a leaf module, `RelformerAttention._z3_leaf`, so the Shaw tables its terms read
    after the position module returns stay gathered) end where one process ends."""
    config = ZERO_2 if stage == 2 else ZERO_3
    ranks = train(torchrun(), tmp_path / "out", per_device=4, deepspeed=config)
    assert_matches_one_process(ranks, one_process, gathered_on_rank0_only=stage == 3)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------------

FSDP_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from helpers import tiny_lm
from test_training import TokenDataset
output = sys.argv[1]
model = tiny_lm("relative").train()
examples = TokenDataset(count=8, ragged=False).examples
batch = {name: torch.stack([example[name] for example in examples]) for name in examples[0]}
rank = 0
if "WORLD_SIZE" in os.environ:  # FSDP2: each RelformerLayer sharded on its own, then the rest
    from torch.distributed.fsdp import fully_shard
    from hf_relformer.modeling_relformer import RelformerLayer
    dist.init_process_group("gloo")
    for module in model.modules():
        if isinstance(module, RelformerLayer):
            fully_shard(module)
    fully_shard(model)
    rank = dist.get_rank()
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    batch = {name: value[4 * rank : 4 * rank + 4] for name, value in batch.items()}
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
for _ in range(3):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
state = {k: getattr(v, "full_tensor", lambda: v)().detach().clone() for k, v in model.state_dict().items()}
torch.save(state, f"{output}/rank{rank}.pt")
"""


def test_two_process_fully_sharded_training_matches_one_process(tmp_path):
    """FSDP2 (`fully_shard`, one unit per RelformerLayer) over two CPU processes (gloo) ends with the weights of one
    process on the whole batch. (Trainer's `fsdp=` cannot be tested here: Accelerate turns its FSDP plugin on only for
    accelerator devices and trains CPU processes with plain DDP, which the tests above cover.)"""
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_SCRIPT)
    (tmp_path / "fsdp").mkdir()
    (tmp_path / "single").mkdir()
    run([*torchrun(), str(script), str(tmp_path / "fsdp"), TESTS_DIR], tmp_path)
    run([sys.executable, str(script), str(tmp_path / "single"), TESTS_DIR], tmp_path)
    rank0, rank1 = (torch.load(tmp_path / "fsdp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    reference = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    initial = tiny_lm("relative").state_dict()
    assert max(float((reference[n] - initial[n]).abs().max()) for n in reference) > 1e-3
    for name in reference:
        assert torch.equal(rank0[name], rank1[name]), name
    assert_same_weights(rank0, reference, atol=1e-4)
