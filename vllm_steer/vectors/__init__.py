"""Where steering vectors come from: the registry and the file formats."""

from vllm_steer.vectors.files import load_registry, load_vector_file
from vllm_steer.vectors.registry import VectorInfo, VectorRegistry, feature_name

__all__ = ["VectorInfo", "VectorRegistry", "feature_name", "load_registry", "load_vector_file"]
