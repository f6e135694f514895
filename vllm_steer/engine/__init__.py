"""The vLLM integration: the steered model classes of each family, the per-step writers of
both model runners, the scheduler's row budget, the front-end hook, the RPC plane, the
offline API, and the one seam (seam.py) through which every vLLM internal is reached."""
