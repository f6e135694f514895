"""The command line (vllm_steer/cli.py, ``vllm-steer``; ``python launch.py`` from a checkout):
usage, argument parsing and prompt files. No engine starts here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from vllm_steer import cli


def test_no_command_prints_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2
    out = capsys.readouterr().out
    assert "vllm-steer serve" in out and "commands: serve, generate, extract, sweep, bench" in out


@pytest.mark.parametrize("command", ["serve", "generate", "extract", "sweep", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_launch_py_is_the_same_command_line():
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), "sweep", "--help"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("usage: vllm-steer sweep") and ".gguf" in done.stdout


def test_read_prompts_lines_or_json(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("Who are you?\n\n  \nTell me a story.\n")
    assert cli.read_prompts(lines) == ["Who are you?", "Tell me a story."]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["one\ntwo", "three"]))  # a JSON list: prompts may span lines
    assert cli.read_prompts(listed) == ["one\ntwo", "three"]
    for bad in ("", " \n", "[]", '["ok", 3]', '["ok", " "]'):
        listed.write_text(bad)
        with pytest.raises(SystemExit, match="expected prompts"):
            cli.read_prompts(listed)
