"""The command line (vllm_steer/cli.py, ``vllm-steer``; ``python launch.py`` from a checkout):
usage, argument parsing and prompt files. No engine starts here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.engines import REPO

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


def test_serve_picks_the_models_family_and_merges_the_users_hf_overrides(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}))
    seen = {}
    monkeypatch.setattr("vllm_steer.engine.seam.run_vllm_serve", lambda argv, prog: seen.update(argv=argv))
    cli.main(["serve", "--model", str(tmp_path), "--hf-overrides", '{"rope_theta": 5.0, "steering": {"max_request_ops": 8}}',
              "--revision", "main", "--port", "8001", "--table-budget-mib", "64"])
    argv = seen["argv"]
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert argv.count("--hf-overrides") == 1 and argv[argv.index("--revision") + 1] == "main" and "--port" in argv
    assert overrides["architectures"] == ["SteeredGemma2ForCausalLM"] and overrides["rope_theta"] == 5.0
    assert overrides["steering"]["max_request_ops"] == 8 and overrides["steering"]["table_budget_mib"] == 64


@pytest.mark.parametrize("flag, kv_space", [([], "4"), (["--kv-cache-memory-bytes", "268435456"], None),
                                             (["--kv-cache-memory-bytes=1G"], None)])
def test_serve_reserves_a_cpu_kv_cache_only_when_the_user_sized_none(flag, kv_space, tmp_path, monkeypatch):
    """vLLM's VLLM_CPU_KVCACHE_SPACE overrides --kv-cache-memory-bytes: setting it by default
    would silently give a server that asked for 256 MiB a 4 GiB cache."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    seen = {}
    monkeypatch.setattr("vllm_steer.engine.seam.run_vllm_serve", lambda argv, prog: seen.update(argv=argv))
    cli.main(["serve", "--model", str(tmp_path), *flag])
    assert "argv" in seen and os.environ.get("VLLM_CPU_KVCACHE_SPACE") == kv_space


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_a_model_of_an_unsupported_family_gets_one_line_naming_it(command, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--model", str(tmp_path), "--prompt", "hi", "--steering", "{}"] if command == "generate" else [command, "--model", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vllm-steer {command}: this model (model_type 'gpt2'") and "Gemma2ForCausalLM" in err
