"""One validator for `lucid train`'s preflight and Trainer.setup: the dataset must fit the run."""

import pytest

from lucid_megatron.config import ConfigError
from lucid_megatron.config.train import CONFIG_DIR, load_train_config
from lucid_megatron.data.shards import read_manifest
from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer
from lucid_megatron.train.validate import check_dataset, split_world


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("validate") / "synth"
    write_synth_dataset(path, RetrievalTask(min_len=40, max_len=64, num_needles=1, num_queries=1), train_docs=40,
                        valid_docs=4, docs_per_shard=10, seed=0, tokenizer=ByteTokenizer())
    return read_manifest(path)


def _config(*overrides):
    return load_train_config(CONFIG_DIR / "demo.yaml",
                             ["data.num_workers=0", "train.global_batch_size=16", "train.micro_batch_size=4",
                              *overrides])


def test_a_fitting_dataset_passes(manifest):
    cfg = _config()
    check_dataset(cfg, manifest, split_world(cfg, 2))


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.num_streams=3"], r"^data: num_streams=3 must be a multiple of dp_size\*num_workers=2"),
    (["data.num_streams=8"], r"^data: dataset '.*' has 4 train shards, fewer than num_streams=8"),
    (["model.vocab_size=200"], r"^model.vocab_size: 200 is smaller than the dataset tokenizer's 259 tokens "
                               r"\(.*manifest.json\)"),
])
def test_what_does_not_fit_is_named(manifest, overrides, message):
    cfg = _config(*overrides)
    with pytest.raises(ConfigError, match=message):
        check_dataset(cfg, manifest, split_world(cfg, 2))
