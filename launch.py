#!/usr/bin/env python
"""vllm-steer command line from a checkout: ``python launch.py X`` is ``vllm-steer X``
(vllm_steer/cli.py; ``pip install`` puts ``vllm-steer`` on PATH).

    python launch.py serve                      # the demo model and vectors, OpenAI API on :8000
    python launch.py serve --model meta-llama/Llama-3.1-8B-Instruct --vectors steering_vectors.pt \\
        --tensor-parallel-size 2 --api-key KEY  # any other vLLM server flag passes through
    python launch.py generate --prompt "Who are you?" --steering '{"vectors": [{"name": "paris", "scale": 0.8}]}'
    python launch.py extract --positive happy.txt --negative sad.txt --layers 10 12 --out happy.gguf
    python launch.py sweep                      # inclusion/fluency vs scale on the demo model (see vllm_steer/lab/sweep.py)
    python launch.py bench --quick              # steered vs unsteered throughput (see benchmarks/run.py)
"""

if __name__ == "__main__":
    from vllm_steer.cli import main

    main()
