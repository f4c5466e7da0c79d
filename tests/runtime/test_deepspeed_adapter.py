"""The one DeepSpeed adapter: its version gate, the internals it relies on (pinned here, per ZeRO stage, on real
engines, so a DeepSpeed upgrade fails in CI and not in a user's resume), and the fragment boxes the optimizer
state is saved as."""

import itertools
import math

import pytest
import torch

from lucid_megatron.checkpoint.optimizer_state import _boxes_of_range, fragment_boxes
from lucid_megatron.runtime import deepspeed_adapter as ds
from tests.distributed import run_on_ranks


def test_an_untested_deepspeed_is_refused_unless_allowed(monkeypatch):
    import deepspeed

    assert ds.check_version() == deepspeed.__version__  # the installed one is the tested one
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with pytest.raises(ds.UntestedDeepSpeed, match=r"DeepSpeed 0\.99\.0 is installed; .* checked on 0\.19\.8 only: "
                                                   r"install deepspeed==0\.19\.8, or set train\.allow_untested"):
        ds.check_version()
    with pytest.warns(UserWarning, match="going on because train.allow_untested_deepspeed is set"):
        assert ds.check_version(allow_untested=True) == "0.99.0"


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2), (2, 1, 5, 3)])
def test_boxes_tile_any_run_of_elements_in_order(shape):
    numel = math.prod(shape)
    for begin, end in itertools.combinations(range(numel + 1), 2):
        covered = []
        for offset, box in _boxes_of_range(shape, begin, end):
            index = torch.arange(numel).reshape(shape)[tuple(slice(o, o + b) for o, b in zip(offset, box))]
            covered += index.reshape(-1).tolist()
        assert covered == list(range(begin, end)), (shape, begin, end)


def _engine_internals(rank, world_size):
    """On each rank, for ZeRO 0-3: the internals the adapter lacks (must be none), how many it relies on, and
    which elements of every parameter this rank's fragment holds (the fragments must tile each parameter)."""
    from lucid_megatron.checkpoint.optimizer_state import _sharded_parameters
    from lucid_megatron.config import load_model_config
    from lucid_megatron.runtime import start_runtime
    from lucid_megatron.runtime.parallelize import EngineOptions, build_engine, build_model
    from lucid_megatron.config.parallel import ParallelConfig

    runtime = start_runtime()
    found = {}
    for stage in (0, 1, 2, 3):
        model = build_model(runtime, load_model_config("tiny", {}), ParallelConfig(), precision="fp32")
        engine = build_engine(model, EngineOptions(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                                   micro_batch_size=1, grad_accum=1, zero_stage=stage,
                                                   grad_clip=1.0, bf16=False))
        pieces = {}
        for name, param, sharded in _sharded_parameters(engine):
            fragment = ds.local_fragment(engine, param)
            if fragment is not None:
                boxes = fragment_boxes(sharded, ds.full_shape(param), fragment, partitioned=stage > 0)
                assert sum(b.end - b.begin for b in boxes) == fragment.numel
                pieces[name] = (fragment.start, fragment.numel, math.prod(ds.full_shape(param)))
        found[stage] = (ds.missing_internals(engine), len(ds.required_internals(engine)), pieces)
        engine.destroy()
    return found


def test_the_internals_it_reads_exist_at_every_zero_stage_and_fragments_tile_the_parameters():
    ranks = run_on_ranks(_engine_internals, 2, timeout=600)
    for stage in (0, 1, 2, 3):
        for rank in ranks:
            missing, relied_on, _ = rank[stage]
            assert missing == [], (stage, missing)
            assert relied_on > 0 or stage == 0
        names = set(ranks[0][stage][2]) | set(ranks[1][stage][2])
        for name in names:
            held = sorted(rank[stage][2][name][:2] for rank in ranks if name in rank[stage][2])
            numel = next(rank[stage][2][name][2] for rank in ranks if name in rank[stage][2])
            if stage == 0:  # no partitions: every rank holds everything
                assert held == [(0, numel), (0, numel)], name
                continue
            position = 0
            for start, count in held:  # ZeRO: the two ranks' fragments meet exactly
                assert start == position, (stage, name, held)
                position += count
            assert position == numel, (stage, name, held)
