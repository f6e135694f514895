"""The OpenAI server's steering additions: the ``steering`` request field, the registry API
under ``/v1/steering/``, and metrics. A vLLM endpoint plugin (``plugin.py``), loaded when
``VLLM_PLUGINS`` names ``vllm_steer`` (``vllm-steer serve`` sets it)."""
