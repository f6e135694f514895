"""Where steering vectors come from: the registry, the file formats and SAE decoders."""

from vllm_steer.vectors.files import FORMATS, export_vectors, load_registry, load_vector_file
from vllm_steer.core.registry import VectorInfo, VectorRegistry, feature_name
from vllm_steer.vectors.sae import load_sae
from vllm_steer.vectors.sources import absolute_source

__all__ = [
    "FORMATS",
    "VectorInfo",
    "VectorRegistry",
    "absolute_source",
    "export_vectors",
    "feature_name",
    "load_registry",
    "load_sae",
    "load_vector_file",
]
