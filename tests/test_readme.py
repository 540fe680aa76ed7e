"""README.md stays true: its quick start has exactly two commands, and its API example runs."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    assert commands == ["pip install . && metadistill reproduce --dataset synthetic --runs 10 --out runs",
                        "pip install -e '.[test]' && python -m pytest -q"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_api_example_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4
    accuracy, lambda1, temperature, hypergrads = map(float, printed)
    assert 0 <= accuracy <= 1 and 0 <= lambda1 <= 1 and 0.1 <= temperature <= 10
    steps = 5 * 7  # 5 epochs of ceil(400 / 64) = 7 steps
    assert hypergrads == sum(1 for t in range(steps) if (t // 10) % 2 == 0)


def test_own_loop_example_runs(capsys):
    """The ResNet-18 -> MobileNetV3-Small example with MetaDistiller, as written."""
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[1]
    assert "MetaDistiller" in code and "mobilenet_v3_small" in code
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("lambda1 ") and printed.strip().endswith("12 hypergradients")
