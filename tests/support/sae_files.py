"""SAE files in two suites' layouts with known decoders (zero biases), shared by the loader
and discovery tests."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save_file


def write_gemma_scope(folder, rows: np.ndarray, *, compressed: bool = False, lower: bool = False):
    """np.savez of W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc, b_dec, threshold (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.npz"
    d_sae, d_model = rows.shape
    arrays = {
        "W_enc": rows.T.copy(),
        "W_dec": rows,
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_model, np.float32),
        "threshold": np.full(d_sae, 0.5, np.float32),
    }
    if lower:
        arrays = {key.lower(): value for key, value in arrays.items()}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_saelens(folder, rows: np.ndarray, config: dict | None):
    folder.mkdir(parents=True, exist_ok=True)
    d_sae, d_in = rows.shape
    save_file(
        {"W_enc": rows.T.copy(), "b_enc": np.zeros(d_sae, np.float32), "W_dec": rows, "b_dec": np.zeros(d_in, np.float32)},
        str(folder / "sae_weights.safetensors"),
    )
    if config is not None:
        (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, **config}))
    return folder
