"""Finding the SAE feature to steer: the most active features of prompts (through the
engine's capture, encoded with the SAE's full encoder) and features by their labels."""

from vllm_steer.discovery.encode import FeatureActivation, PromptFeatures, TokenFeatures, top_features_of_streams
from vllm_steer.discovery.explanations import Explanations, FeatureMatch, load_explanations, search_features

__all__ = [
    "Explanations",
    "FeatureActivation",
    "FeatureMatch",
    "PromptFeatures",
    "TokenFeatures",
    "load_explanations",
    "search_features",
    "top_features_of_streams",
]
