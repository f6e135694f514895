"""Every SAE suite encodes exactly as its own reference does (tests/support/sae_references.py, each
suite's encoder written from its reference code): the per-feature encoder that
``feature_clamp`` and conditions read, the whole encoder that finds features, and the decoder
direction a feature steers along, each on a file with a non-zero ``b_dec`` (and a dataset-wise
input normalization where the suite has one). Each check also shows that reading the suite
the other way round (subtracting ``b_dec`` or not) would fail it.

Here without an engine; tests/engine/test_sae_encoders_engine.py runs ``feature_clamp``, a
feature condition and ``top_features`` of every suite through the model runners against the
same references."""

from __future__ import annotations

import numpy as np
import pytest
from support.sae_references import FEATURE, SUITES, TOP_K

from vllm_steer.discovery import top_features_of_streams
from vllm_steer.vectors import load_sae

D_MODEL, D_SAE = 256, 32
TOPK_SUITES = ["dictionary_learning AutoEncoderTopK", "Qwen-Scope"]  # one feature's activation needs all of them
THRESHOLD_SUITES = [name for name in SUITES if name not in TOPK_SUITES]


def random_streams(seed: int = 0, tokens: int = 40) -> np.ndarray:
    """Streams shaped like a residual stream: a shared offset, then noise."""
    rng = np.random.default_rng(seed)
    return (2.0 + rng.standard_normal((tokens, D_MODEL)) * 3.0).astype(np.float32)


def engine_activation(encoder, streams: np.ndarray) -> np.ndarray:
    """``act(<row, h> + offset)`` as the steering layer computes it (FeatureEncoder)."""
    pre = streams.astype(np.float64) @ encoder.row.astype(np.float64) + encoder.offset
    return np.where(pre > encoder.threshold, pre, 0.0)


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("suites")
    calibration = random_streams(1)
    return {name: make(root, calibration, 2, D_SAE) for name, make in SUITES.items()}


@pytest.mark.parametrize("name", THRESHOLD_SUITES)
def test_a_features_encoder_is_the_references(suites, name):
    sae = suites[name]
    streams = random_streams(2)
    expected = sae.activation(streams)[:, FEATURE]
    got = engine_activation(load_sae(sae.source).encoder(FEATURE), streams)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert 0 < (expected > 0).sum() < len(expected)  # fires on some tokens, not all
    # Read the other way round (b_dec subtracted or not), tokens' activations move by ~1.5x their spread.
    assert np.abs(sae.other_b_dec(streams)[:, FEATURE] - expected).max() > 0.5


@pytest.mark.parametrize("name", list(SUITES))
@pytest.mark.parametrize("over", ["last", "mean", "token"])
def test_top_features_are_the_references(suites, name, over):
    sae = suites[name]
    streams = [random_streams(3, 5), random_streams(4, 9)]

    def ranked(activations):
        rows = {"last": activations[-1:], "mean": activations.mean(0, keepdims=True), "token": activations}[over]
        return [sorted((i for i in range(D_SAE) if row[i] > 0), key=lambda i: (-row[i], i))[:5] for row in rows]

    got = top_features_of_streams(streams, load_sae(sae.source), 5, over, features_per_chunk=7)
    got_features = [[f.feature for f in group] for result in got
                    for group in ([t.features for t in result.tokens] if over == "token" else [result.features])]
    expected = [group for s in streams for group in ranked(sae.activation(s))]
    assert got_features == expected
    values = [f.activation for result in got
              for group in ([t.features for t in result.tokens] if over == "token" else [result.features]) for f in group]
    reference = [v for s in streams for group_values in _values(sae.activation(s), ranked, over) for v in group_values]
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-4)
    assert expected != [group for s in streams for group in ranked(sae.other_b_dec(s))]


def _values(activations, ranked, over):
    rows = {"last": activations[-1:], "mean": activations.mean(0, keepdims=True), "token": activations}[over]
    return [[row[i] for i in group] for row, group in zip(rows, ranked(activations))]


@pytest.mark.parametrize("name", list(SUITES))
def test_a_features_direction_is_in_the_streams_units(suites, name):
    """The decoder column or row, divided by the input scale where the suite folds one in."""
    sae = suites[name]
    got = load_sae(sae.source).feature(FEATURE)
    np.testing.assert_allclose(got, sae.direction(FEATURE), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", TOPK_SUITES)
def test_topk_suites_cannot_clamp_one_feature(suites, name):
    with pytest.raises(ValueError, match=rf"TopK, k={TOP_K}\) cannot be computed per token"):
        load_sae(suites[name].source).encoder(FEATURE)


def test_subtract_b_dec_overrides_the_suite(suites):
    sae = suites["Gemma Scope"]
    streams = random_streams(5)
    forced = load_sae(f"{sae.source}#subtract_b_dec=1").encoder(FEATURE)
    np.testing.assert_allclose(engine_activation(forced, streams), sae.other_b_dec(streams)[:, FEATURE], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="subtract_b_dec must be 0 or 1, got 2"):
        load_sae(f"{sae.source}#subtract_b_dec=2")


def test_saelens_normalizations_are_honoured_or_refused_by_name(tmp_path, suites):
    import json
    import shutil
    from pathlib import Path

    scaled = suites["SAELens expected_average_only_in"].source.split("#")[0]
    with pytest.raises(ValueError, match=r"normalize_activations 'expected_average_only_in'.*#norm_scaling_factor=S"):
        load_sae(scaled).encoder(FEATURE)
    with pytest.raises(ValueError, match="norm_scaling_factor must be a positive number, got '-1'"):
        load_sae(f"{scaled}#norm_scaling_factor=-1")
    plain = suites["SAELens standard"].source
    with pytest.raises(ValueError, match="norm_scaling_factor is given but cfg.json says normalize_activations 'none'"):
        load_sae(f"{plain}#norm_scaling_factor=2")
    with pytest.raises(ValueError, match="norm_scaling_factor applies to SAELens SAEs"):
        load_sae(f"{suites['Gemma Scope'].source}#norm_scaling_factor=2")
    for normalize in ("constant_norm_rescale", "layer_norm", "covariance_whitening"):
        folder = tmp_path / normalize / Path(plain).name
        shutil.copytree(plain, folder)
        config = json.loads((folder / "cfg.json").read_text()) | {"normalize_activations": normalize}
        (folder / "cfg.json").write_text(json.dumps(config))
        sae = load_sae(str(folder))
        with pytest.raises(ValueError, match=rf"normalize_activations '{normalize}': the encoder normalizes each token"):
            sae.encoder(FEATURE)
        with pytest.raises(ValueError, match=rf"normalize_activations '{normalize}'"):
            sae.encoding  # noqa: B018 - finding features refuses it too
        assert sae.feature(FEATURE).shape == (D_MODEL,)  # its directions still steer


def test_llama_scope_token_wise_normalization_is_refused(suites, tmp_path):
    import json
    import shutil
    from pathlib import Path

    folder = Path(suites["Llama Scope"].source).parent.parent
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "hyperparams.json").read_text()) | {"norm_activation": "token-wise"}
    (copy / "hyperparams.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="norm_activation 'token-wise': the encoder rescales each token by its own norm"):
        load_sae(str(copy)).encoder(FEATURE)


def test_replacing_a_layers_sae_forgets_what_was_read_from_the_old_one(suites):
    from vllm_steer.core.registry import VectorRegistry

    registry = VectorRegistry()
    first, second = (load_sae(suites[name].source) for name in ("Gemma Scope", "Goodfire"))
    registry.add_feature_source(first)
    old = registry.sae_feature(2, FEATURE)
    registry.add_feature_source(second)
    new = registry.sae_feature(2, FEATURE)
    assert registry.array(new[0]).tobytes() == second.feature(FEATURE).tobytes() and new[:2] != old[:2]
