"""Placement on a stand-in accelerator: one training step where the device is not the CPU.

The stand-in is PyTorch's ``meta`` device (tensors with shapes and devices but no data) under PyTorch's
``fake`` process group (collectives that accept any device and move nothing; a world of one). Every
collective is instrumented to record the device of each tensor it receives, as NCCL would refuse a CPU
tensor. A training step, a validation pass, the preemption agreement and the data digest then run through
the real runtime, model builder and step code. What the stand-in cannot give: values (host reads return
zeros, so the step's branches are not exercised by data) and DeepSpeed, which cannot run on the meta
device (a named stand-in engine below does backward and no update). Megatron's and DeepSpeed's own GPU
paths are checked by ``lucid selftest gpu`` on a real GPU.
"""

import os

import pytest
import torch
import torch.distributed as dist

from lucid_megatron.config import ParallelConfig, load_model_config
from lucid_megatron.data import MicroBatch, make_eval_loader, make_train_loader
from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer
from lucid_megatron.runtime import Runtime, start_runtime, stop_runtime
from lucid_megatron.runtime.parallelize import build_model
from lucid_megatron.train.engine import evaluate, rows_digest, train_step
from lucid_megatron.train.signals import PreemptionFlag

META = torch.device("meta")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "all_to_all_single", "reduce")


class StandInEngine:
    """Stands in for DeepSpeed (which cannot run on the meta device): forward, backward, no update."""

    def __init__(self, module):
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
        self.backward_calls = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()
        self.backward_calls += 1

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


@pytest.fixture
def stand_in(monkeypatch):
    """Fake process group + instrumented collectives + host reads of meta tensors; torn down after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    received = []
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            received.extend((_name, t.device) for t in tensors)
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, recording)

    def host(values):
        assert values.device == META, f"host read of a tensor on {values.device}"
        return [0.0] * values.numel()

    monkeypatch.setattr(Runtime, "host", staticmethod(host))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        yield received
    finally:
        stop_runtime()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("placement") / "synth"
    write_synth_dataset(path, RetrievalTask(min_len=40, max_len=64, num_needles=1, num_queries=1), train_docs=40,
                        valid_docs=8, docs_per_shard=20, seed=0, tokenizer=ByteTokenizer())
    return path


def test_a_training_step_keeps_every_tensor_on_the_device(stand_in, dataset):
    runtime = start_runtime(1, device=META)
    # NoPE: Megatron's THD RoPE reads cu_seqlens back to the host, which the meta device cannot do
    cfg = load_model_config("tiny", {"position_embedding": "none"})
    model = build_model(runtime, cfg, ParallelConfig(), precision="fp32", initialize=False)
    assert {p.device for p in model.parameters()} == {META}
    engine = StandInEngine(model)

    loader = make_train_loader(dataset, seq_length=64, micro_batch_size=2, dp_rank=0, dp_size=1, num_streams=2,
                               num_workers=0, seed=0)
    batches = [next(loader) for _ in range(2)]
    placed = runtime.micro_batches(batches)
    for mb, source in zip(placed, batches):
        for name in ("tokens", "labels", "loss_weight", "position_ids"):
            assert getattr(mb, name).device == META, name
        assert mb.plan.cu_seqlens_device.device == META
        assert mb.plan.cu_seqlens == tuple(source.cu_seqlens.tolist())  # boundaries stay readable on the host

    train_step(engine, runtime, placed, lr=1e-3)
    assert engine.backward_calls == 2
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())
    valid = make_eval_loader(dataset, seq_length=64, micro_batch_size=2, dp_rank=0, dp_size=1, num_streams=1,
                             max_rows=2)
    evaluate(engine, runtime, runtime.micro_batches(valid), runtime.micro_batch(MicroBatch.padding(2, 64, 258)))
    flag = PreemptionFlag()
    try:
        flag.agreed(runtime)
    finally:
        flag.restore()
    rows_digest(runtime, batches, 64)

    kinds = {name for name, _ in stand_in}
    assert {"all_reduce"} <= kinds and len(stand_in) >= 6, stand_in
    misplaced = [(name, str(device)) for name, device in stand_in if device != META]
    assert not misplaced, f"collectives got tensors off the device: {misplaced}"


def test_the_cp_split_builds_the_layout_once_with_the_index_map():
    """Under CP the split gives each local token's source index and the plan the zigzag layout, once per
    micro-batch; packed_seq_params hands that same plan to every attention layer."""
    import dataclasses

    from lucid_megatron.parallel.context import ZigzagLayout, split_micro_batch
    from lucid_megatron.parallel.plan import build_plan
    from lucid_megatron.runtime.placement import PlacedMicroBatch, packed_seq_params

    mb = MicroBatch.padding(num_rows=1, seq_length=23, pad_id=0)
    mb = dataclasses.replace(mb, tokens=torch.arange(1, 24).reshape(1, -1),
                             cu_seqlens=torch.tensor([0, 9, 23], dtype=torch.int32))
    seen = []
    for rank in (0, 1):
        local, source_positions = split_micro_batch(mb, 2, rank)
        plan = build_plan(local.cu_seqlens.tolist(), torch.device("cpu"), cp_size=2, cp_rank=rank,
                          cp_comm_type="p2p", source_positions=source_positions)
        seen += plan.source_positions[plan.source_positions >= 0].tolist()
        assert plan.layout == ZigzagLayout((12, 16), 2, rank)  # documents padded to multiples of 2 * cp
        placed = PlacedMicroBatch(local.tokens, local.labels, local.loss_weight, local.position_ids, plan)
        assert packed_seq_params(placed).plan is plan
        real = plan.source_positions >= 0
        assert torch.equal(local.tokens[0][real], mb.tokens[0][plan.source_positions[real]])
        assert (local.tokens[0][~real] == 0).all()
    assert sorted(seen) == list(range(23))  # every token on exactly one rank


def test_a_world_of_one_leaves_no_torchrun_variable_behind(monkeypatch):
    """DeepSpeed needs LOCAL_RANK even for one process; once the runtime stops it must be gone again, or a
    subprocess started later (lm-eval's accelerate, torchrun) believes it is a torchrun worker."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    start_runtime(1)
    try:
        assert os.environ["LOCAL_RANK"] == "0"
    finally:
        stop_runtime()
    assert "LOCAL_RANK" not in os.environ
    monkeypatch.setenv("LOCAL_RANK", "3")  # one the caller set is the caller's: kept
    start_runtime(1)
    stop_runtime()
    assert os.environ["LOCAL_RANK"] == "3"
