"""Head blob: layout, validation, and inference identical to Int8Head on real embeddings."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead
from firmware_bridge.head_blob import HeadBlobError, blob_size, decode_head, encode_head


def _random_head(adapter_dim: int, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    head = PersonalizationHead.initial(HeadConfig(64, 7, adapter_dim), rng)
    mean = rng.normal(size=64).astype(np.float32)
    std = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    return head.quantized(), mean, std


@pytest.mark.parametrize("adapter_dim", [32, 0])
def test_layout_and_round_trip(adapter_dim: int) -> None:
    q, mean, std = _random_head(adapter_dim)
    blob = encode_head(q, mean, std)
    dims = [(64, 32), (32, 7)] if adapter_dim else [(64, 7)]
    assert len(blob) == blob_size(64, dims)
    assert blob[:8] == b"EFHD" + struct.pack("<BBH", 1, len(dims), 64)
    head = decode_head(blob)
    assert np.array_equal(head.mean, mean) and np.array_equal(head.std, std)
    expected = [(i, o, k < len(dims) - 1) for k, (i, o) in enumerate(dims)]
    assert [(layer.in_dim, layer.out_dim, layer.relu) for layer in head.layers] == expected
    first = q.weights["adapter.w" if adapter_dim else "classifier.w"]
    assert np.array_equal(head.layers[0].weights, first.q) and np.array_equal(head.layers[0].scales, first.scale)
    off = 8 + 8 * 64 + 5  # first layer's weights, row-major (in x out)
    assert blob[off:off + first.q.size] == first.q.tobytes()
    assert head.to_bytes() == blob


def test_predict_equals_int8_head_on_real_embeddings(embedded) -> None:  # type: ignore[no-untyped-def]
    std = embedded.standardizer
    x_train = std(embedded.train_emb)
    config = HeadConfig(x_train.shape[1], len(embedded.class_names))
    head = PersonalizationHead.initial(config, np.random.default_rng(0))
    head = head.fit(x_train, embedded.train.y, FitConfig(epochs=3), np.random.default_rng(1))
    q = head.quantized()
    blob = decode_head(encode_head(q, std.mean, std.std))
    classes, scores = blob.predict(embedded.test_emb)  # raw embeddings: the blob standardizes
    expected = q.predict(std(embedded.test_emb))
    assert np.array_equal(classes, expected)
    assert (classes == embedded.test.y).mean() > 0.5  # a real, trained head, not a trivial one
    logits = q.logits(std(embedded.test_emb)).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(scores, (p / p.sum(axis=1, keepdims=True)).max(axis=1), rtol=1e-5)
    assert np.all((scores > 1 / 7 - 1e-6) & (scores <= 1))


def test_single_embedding_and_wrong_width() -> None:
    q, mean, std = _random_head(32)
    head = decode_head(encode_head(q, mean, std))
    classes, scores = head.predict(np.ones(64, np.float32))
    assert classes.shape == (1,) and scores.shape == (1,)
    with pytest.raises(ValueError, match="expects 64"):
        head.predict(np.ones((2, 63), np.float32))


def _patched(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value):]


SCALES0 = 8 + 8 * 64 + 5 + 64 * 32  # layer 0's scales[0] in a 64 -> 32 -> 7 blob


def test_errors_are_precise() -> None:
    q, mean, std = _random_head(32)
    blob = encode_head(q, mean, std)
    cases = [
        (b"EFH", "truncated: header"),
        (b"XFHD" + blob[4:], "bad magic"),
        (_patched(blob, 4, b"\x02"), "blob version 2"),
        (_patched(blob, 5, b"\x00"), "n_layers is 0"),
        (_patched(blob, 6, b"\x00\x00"), "embedding_dim is 0"),
        (_patched(blob, 6, b"\x41\x00"), "previous width is 65"),
        (blob[:100], "truncated: mean"),
        (blob[:-1], "truncated: layer 1 bias"),
        (blob + b"\x00", "1 trailing bytes"),
        (_patched(blob, 8 + 512, b"\x3f\x00"), "layer 0: in=63"),
        (_patched(blob, 8 + 512 + 4, b"\x02"), "relu flag is 2"),
        (_patched(blob, 8 + 256, struct.pack("<f", 0.0)), r"std\[0\] = 0.0: every value must be finite and > 0"),
        (_patched(blob, 8 + 256 + 4, struct.pack("<f", float("inf"))), r"std\[1\] = inf"),
        (_patched(blob, 8, struct.pack("<f", float("nan"))), r"mean\[0\] = nan: every value must be finite$"),
        (_patched(blob, SCALES0 + 8, struct.pack("<f", 0.0)), r"layer 0 scales\[2\] = 0.0: .* finite and > 0"),
        (_patched(blob, SCALES0, struct.pack("<f", -0.25)), r"layer 0 scales\[0\] = -0.25"),
        (_patched(blob, SCALES0 + 4 * 32, struct.pack("<f", float("-inf"))), r"layer 0 bias\[0\] = -inf"),
    ]
    for bad, text in cases:
        with pytest.raises(HeadBlobError, match=text):
            decode_head(bad)
    with pytest.raises(HeadBlobError, match="std"):
        encode_head(q, mean, np.zeros(64, np.float32))
    with pytest.raises(HeadBlobError, match="previous width"):
        encode_head(q, mean[:10], std[:10])
