"""The bundled demo: a small Llama trained on a synthetic corpus of chats about five topics
(Paris, the ocean, cooking, space, dogs), and concept vectors for those topics
(vllm_steer/lab/demo reproduces both).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def demo_model_path() -> Path:
    """The committed demo model (a Hugging Face Llama folder vLLM loads; run it in float32)."""
    return HERE / "model"


def demo_vectors_path() -> Path:
    """The committed demo vectors: one layered vector per topic, named after it."""
    return HERE / "vectors.safetensors"
