import os

import pytest
import torch

# The kernel tests run Triton under its interpreter (on CPU tensors; TRITON_INTERPRET=0 overrides it).
# Triton reads the setting when it is first imported, and other test modules import it indirectly
# (transformers does), so it is set here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)



# Test modules share trained runs through module-scoped fixtures, and tests/convert through session-scoped ones:
# under pytest-xdist (`-n 2`, the README's test command) each of these groups runs whole on one worker, so
# nothing is trained twice. (xdist's own `--dist loadgroup` marks do not reach its scheduler under pytest 9: the
# group goes into a private node id that pytest no longer reads; the scheduler below groups by path instead.)
SESSION_GROUPS = ("tests/convert/",)
# The longest groups start first, so that no worker is left with a long one at the end (docs/developers.md);
# everything else keeps its order.
LONGEST_FIRST = ("tests/train/test_training.py", "tests/launch/test_slurm.py", "tests/convert/",
                 "tests/train/test_faults.py", "tests/eval/test_experiment.py", "tests/eval/test_eval.py",
                 "tests/train/test_mixture_training.py", "tests/data/test_prepare.py",
                 "tests/train/test_resume_checks.py", "tests/parallel/test_cp_model.py",
                 "tests/parallel/test_cp_attention.py", "tests/checkpoint/test_reader_lock.py")


def _group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return next((prefix for prefix in SESSION_GROUPS if path.startswith(prefix)), path)


def _order(item) -> tuple[bool, int]:
    from tests import background

    group = _group(item.nodeid)
    return background.reads_a_job(item), LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_configure(config):
    from tests import background

    if not hasattr(config, "workerinput"):  # the controller (or the only process), before any worker starts
        background.open_session()


def pytest_collection_modifyitems(session, config, items):
    from tests import background

    items.sort(key=_order)  # stable: the same order in every xdist worker
    if not config.option.collectonly:
        background.start_jobs(items)  # slow independent checks start now, in the background; their tests run last


@pytest.hookimpl(optionalhook=True)  # xdist's hook: a run with -p no:xdist must not refuse it
def pytest_xdist_make_scheduler(config, log):
    """Whole groups (``_group``) to a worker, in collection order (longest first), whatever ``--dist`` says."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order, not the number of tests per group
    return ByGroup(config, log)


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    if not hasattr(session.config, "workerinput"):
        background.close_session()
