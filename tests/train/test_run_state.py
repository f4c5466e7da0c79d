"""The trainer's saved state: each part saves and loads its own keys of state.json, in today's format."""

import json

import pytest

from lucid_megatron.config.train import CONFIG_DIR, load_train_config
from lucid_megatron.train.run_state import DataPositions, LayoutRecord, RunState, TokenizerRecord, TrainProgress
from lucid_megatron.train.schedule import LRSchedule, RunLayout, lr_at

TOKENIZER = {"kind": "byte", "vocab_size": 259, "pad_id": 258}


def _stream(rows: int) -> dict:
    return {"epoch": 0, "shard": 0, "doc": rows, "offset": 0, "rows": rows, "num_streams": 4}


class _Batch:
    def __init__(self, **streams):
        self.stream_states = {key.removeprefix("s"): value for key, value in streams.items()}


def _run_state(gather=lambda local: [local]) -> RunState:
    cfg = load_train_config(CONFIG_DIR / "demo.yaml", ["train.steps=100"])
    return RunState(progress=TrainProgress(), data=DataPositions(gather), lr_schedule=LRSchedule(cfg),
                    layout=LayoutRecord.of(RunLayout(2, 1, 1), zero_stage=1), tokenizer=TokenizerRecord(TOKENIZER))


def test_state_json_keys_and_round_trip():
    state = _run_state()
    for step in (1, 2, 3):
        state.lr_schedule.step()
        state.data.advance([_Batch(s0=_stream(step)), _Batch(s2=_stream(step))])
        state.progress.record(step, nonfinite=step == 2)
    saved = json.loads(json.dumps({"step": 3, **state.state_dict()}))  # as Checkpointer.save writes it
    assert list(saved) == ["step", "layout", "data", "nonfinite_steps", "tokenizer", "lr_schedule"]
    assert saved["layout"] == {"world_size": 2, "tensor_parallel": 1, "context_parallel": 1, "data_parallel": 2,
                               "zero_stage": 1}
    assert saved["data"] == {"0": _stream(3), "2": _stream(3)} and saved["nonfinite_steps"] == 1
    assert saved["tokenizer"] == TOKENIZER and saved["lr_schedule"]["step"] == 3

    resumed = _run_state()
    resumed.load_state_dict(saved)
    progress = resumed.progress
    assert (progress.step, progress.nonfinite_steps, progress.consecutive_nonfinite) == (3, 1, 0)
    assert resumed.data.restored == saved["data"] and resumed.layout.same_as_saved
    assert resumed.lr_schedule.step() == pytest.approx(lr_at(resumed.lr_schedule.cfg, 4))


def test_a_checkpoint_from_before_the_parts_resumes():
    """state.json as written before the LR schedule recorded itself: the schedule continues at its step."""
    old = {"step": 7, "layout": {"world_size": 1, "tensor_parallel": 1, "context_parallel": 1, "data_parallel": 1,
                                 "zero_stage": 1},
           "data": {"0": _stream(7)}, "nonfinite_steps": 2, "tokenizer": TOKENIZER}
    state = _run_state()
    state.load_state_dict(old)
    assert state.progress.step == 7 and state.progress.nonfinite_steps == 2 and state.lr_schedule.last_step == 7
    assert not state.layout.same_as_saved and state.layout.describe_change().startswith("saved {'world_size': 1")
    assert _run_state().state_dict()["data"] == {}  # a fresh run: no positions yet


def test_data_positions_are_saved_from_the_ranks_that_read_them():
    """Two DP ranks resumed from one checkpoint: each advances its own streams; the save holds every stream's
    newest position, never a rank's stale copy of another's."""
    checkpoint = {"data": {str(s): _stream(5) for s in range(4)}}
    ranks = [DataPositions(), DataPositions()]
    for rank in ranks:
        rank.load_state_dict(checkpoint)
    ranks[0].advance([_Batch(s0=_stream(6), s2=_stream(6))])
    ranks[1].advance([_Batch(s1=_stream(6)), _Batch(s3=_stream(7))])
    for rank in ranks:
        rank.gather = lambda local: [ranks[0].advanced, ranks[1].advanced]
    want = {"0": _stream(6), "1": _stream(6), "2": _stream(6), "3": _stream(7)}
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"data": want}


def test_progress_counts_consecutive_nonfinite_steps():
    progress = TrainProgress()
    for step, nonfinite in enumerate([True, True, False, True], start=1):
        progress.record(step, nonfinite)
    assert (progress.step, progress.nonfinite_steps, progress.consecutive_nonfinite) == (4, 3, 1)
