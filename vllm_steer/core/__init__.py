"""The steering core: the request spec, the resolved plan and its wire form, the vector
registry, the row pool, the slot runtime and the layer math (with its Triton kernel).
Torch, numpy and pydantic only: nothing here imports vLLM."""
