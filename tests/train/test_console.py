"""`lucid train`'s console holds our own lines only; what the libraries say goes to RUN_DIR/logs/."""

import logging
import subprocess
import sys
import warnings

import pytest

from lucid_megatron.runtime import console
from lucid_megatron.runtime.process import available_cores, threads_per_process


@pytest.fixture
def restored_logging():
    """The routing rewires process-wide state; put every logger's handlers and showwarning back afterwards."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = {lg: list(lg.handlers) for lg in loggers}
    showwarning = warnings.showwarning
    yield
    if console._installed is not None:
        console._installed.uninstall()
        console._installed = None
    for lg, handlers in saved.items():
        lg.handlers[:] = handlers
    warnings.showwarning = showwarning


def test_routing_keeps_our_warnings_and_library_errors_on_the_console(tmp_path, capsys, restored_logging):
    """A library's warning goes to the file only, once however often it repeats; a warning from our code and a
    library's ERROR record reach the console too; held records reach the file only when released (a run
    refused by its checks writes no run directory)."""
    library = logging.getLogger("some_library")
    library.propagate = False
    library.addHandler(logging.StreamHandler(sys.stderr))
    log_file = tmp_path / "logs" / "rank_0.log"
    console.route_library_output(log_file, hold=True)

    for _ in range(3):
        warnings.warn_explicit("a library hint", UserWarning, "/site-packages/lib/module.py", 7,
                               registry={})  # a fresh registry each time, as libraries' catch_warnings cause
    warnings.warn_explicit("one of ours", UserWarning, console.PACKAGE_DIR + "/data/shards.py", 3, registry={})
    library.warning("chatter")
    library.error("it broke")

    assert not log_file.parent.exists()
    console.release_log_file()
    err = capsys.readouterr().err
    assert "a library hint" not in err and "chatter" not in err
    assert "one of ours" in err and "some_library ERROR: it broke" in err
    text = log_file.read_text()
    assert text.count("UserWarning: a library hint") == 1
    assert "one of ours" in text and "chatter" in text and "it broke" in text


def test_threads_follow_omp_num_threads_or_share_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(8) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_process(1) == available_cores()
    assert threads_per_process(available_cores() * 4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS='0' is not allowed; set a whole number >= 1"):
        threads_per_process(2)


def test_train_help_imports_no_training_library():
    """`lucid train --help` imports the train command's module and no other command's (convert's brings torch),
    and nothing beyond what `import lucid_megatron` loaded among torch, DeepSpeed, Megatron and transformers."""
    code = (
        "import sys, lucid_megatron\n"
        "heavy = lambda: {m for m in ('torch', 'deepspeed', 'megatron', 'transformers') if m in sys.modules}\n"
        "before = heavy()\n"
        "from lucid_megatron.cli import SUBCOMMANDS, main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('COMMANDS', sorted(m for m, _ in SUBCOMMANDS.values() if m in sys.modules))\n"
        "print('HEAVY', sorted(heavy() - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--nproc-per-node" in result.stdout, result.stdout + result.stderr
    assert "COMMANDS ['lucid_megatron.train.cli']" in result.stdout and "HEAVY []" in result.stdout, result.stdout
