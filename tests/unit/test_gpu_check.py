"""The GPU check (benchmarks/gpu_check.py) runs on a CPU at tiny sizes, with the
Triton kernel through the interpreter, so it cannot rot between GPU runs; and it never
imports vLLM (it goes to machines that have torch and Triton but not vLLM)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from support import engines

REPO = str(engines.REPO)

# main() in a fresh interpreter, then: which vllm modules got imported.
SCRIPT = """
import sys
from benchmarks.gpu_check import main
main(["--quick", "--out", sys.argv[1]])
print("VLLM_MODULES", [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")])
"""


def test_quick_run_on_cpu_writes_every_section_without_vllm(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "VLLM_MODULES []" in done.stdout

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) >= {"environment", "quick", "sync", "timing", "memory", "kernel"}
    assert "no CUDA device" in report["sync"]["skipped"]

    rows = report["timing"]["rows"]
    assert {row["variant"] for row in rows} == {"eager", "compile", "triton"}
    assert {(row["tokens"], row["directions"]) for row in rows} == {(t, k) for t in (1, 4) for k in (0, 1, 4)}
    for row in rows:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["gap_vs_eager_roundings"] <= 1, row
    choice = report["timing"]["kernel_choice"]
    assert choice["recommendation"] in ("torch", "triton") and choice["cells"] == 6
    assert "**Kernel choice:**" in (tmp_path / "gpu_check.md").read_text()

    memory = report["memory"]
    assert memory["small_case"]["match"], memory["small_case"]
    assert {(r["hidden"], r["layers"], r["max_num_seqs"]) for r in memory["rows"]} == {
        (h, n, s) for h, n in ((4096, 32), (8192, 80)) for s in (1024, 256)}
    # The default budget bounds the pool where a row per request and layer would take GiBs.
    assert all(r["total_mib"] < 256 + 16 < r["unbounded_gib"] * 1024 / 2 for r in memory["rows"]), memory["rows"]

    assert report["kernel"]["ok"], report["kernel"]

    markdown = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)"):
        assert heading in markdown
    assert "| tiny | 4 | 4 |" in markdown and "FAIL" not in markdown
