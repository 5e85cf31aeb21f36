"""A test that hangs fails, named, with the stacks of its threads, and the suite goes on (setup.cfg's
pytest-timeout settings): a hang once held a fresh clone's CI with nothing to read."""

import re
import sys

from conftest import REPO, run_cli, tail

HANGING = """
import threading


def test_hangs_inside_c():
    threading.Event().wait()  # a lock acquired in C: no Python bytecode runs until it returns


def test_after_it():
    assert True
"""


def test_a_hung_test_fails_named_with_its_stack_and_the_next_test_still_runs(tmp_path):
    """The suite's own settings (setup.cfg, brought down to seconds), on an xdist worker as make test
    runs: the stacks reach stderr, the hung worker ends, xdist names the test and gives the file's next
    test a new worker."""
    (tmp_path / "test_hanging.py").write_text(HANGING)
    done = run_cli(
        sys.executable,
        *("-m", "pytest", "-c", str(REPO / "setup.cfg"), "--rootdir", str(tmp_path), "-p", "no:cacheprovider"),
        *("-o", "faulthandler_timeout=2", "-o", "timeout=4", "-n", "1", str(tmp_path / "test_hanging.py")),
        timeout=120,
    )
    assert done.returncode == 1, tail(done)
    assert "test_hanging.py::test_hangs_inside_c" in done.stdout and "1 failed, 1 passed" in done.stdout, tail(done)
    hung = re.search(r'test_hanging.py", line \d+ in test_hangs_inside_c', done.stderr)  # its thread's stack
    assert done.stderr.startswith("Timeout") and hung, tail(done)
