"""Strategy mechanics: what leaves the device, how the server folds it in. Pure, no broker."""

import numpy as np
import pytest

from edge_agent.learning.aggregate import WeightedMean
from edge_agent.learning.head import HeadConfig, features
from edge_agent.learning.strategies import (
    STRATEGIES, ClientData, ClientState, ClientUpdate, make_strategy,
)

HEAD = HeadConfig(in_dim=6, num_classes=3, adapter_dim=4)


def _client(seed: int) -> ClientData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((30, 6)).astype(np.float32)
    y = np.arange(30) % 3
    return ClientData(x, y, x[:9], y[:9])


@pytest.mark.parametrize("name, shared", [
    ("local", set()),
    ("fedavg", {"adapter.w", "adapter.b", "classifier.w", "classifier.b"}),
    ("fedper", {"adapter.w", "adapter.b"}),
    ("fedrep", {"adapter.w", "adapter.b"}),
    ("lg-fedavg", {"classifier.w", "classifier.b"}),
    ("ditto", {"adapter.w", "adapter.b", "classifier.w", "classifier.b"}),
])
def test_declared_split(name: str, shared: set[str]) -> None:
    s = make_strategy(name, HEAD)
    assert s.shared_keys == shared
    assert s.personal_keys == set(HEAD.keys) - shared


def test_an_update_cannot_carry_a_personal_tensor() -> None:
    with pytest.raises(ValueError, match="classifier.w"):
        ClientUpdate({"classifier.w": np.zeros((4, 3), np.float32)}, 10, frozenset({"adapter.w"}))


def test_weighted_mean_golden() -> None:
    m = WeightedMean()
    m.add({"a": np.array([1.0, 0.0])}, 1)
    m.add({"a": np.array([4.0, 3.0])}, 2)
    np.testing.assert_allclose(m.result()["a"], [3.0, 2.0])
    with pytest.raises(ValueError, match="differ"):
        m.add({"b": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="positive"):
        m.add({"a": np.zeros(2)}, 0)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_round_trip_keeps_personal_state_on_device_and_server_shape_stable(name: str) -> None:
    s = make_strategy(name, HEAD)
    rng = np.random.default_rng(0)
    server = s.init_server(rng)
    states = [s.init_client(np.random.default_rng(i)) for i in range(3)]
    for _ in range(3):
        updates = []
        for i in range(3):
            states[i], u = s.client_round(server, states[i], _client(i), np.random.default_rng(i))
            if u is not None:
                assert set(u.tensors) <= s.shared_keys
                assert not set(u.tensors) & s.personal_keys
                updates.append(u)
        keys_before = set(server.params)
        server = s.aggregate(server, updates)
        assert set(server.params) == keys_before
    assert server.version == 3
    head = s.personalized(server, states[0], _client(0), rng)
    assert set(head) == set(HEAD.keys)


def test_no_updates_leaves_the_global_head_unchanged_and_counts_failures() -> None:
    from edge_agent.learning.strategies import ClientFailure

    s = make_strategy("fedavg", HEAD)
    server = s.init_server(np.random.default_rng(0))
    after = s.aggregate(server, [], [ClientFailure("dev-1", "timed out")])
    assert after.failed == 1 and after.reported == 0 and after.version == 1
    for k in server.params:
        np.testing.assert_array_equal(after.params[k], server.params[k])


def test_ncm_round_one_builds_an_exact_nearest_class_mean_classifier() -> None:
    s = make_strategy("ncm", HEAD)
    server = s.init_server(np.random.default_rng(0))
    clients = [_client(i) for i in range(3)]
    updates = []
    for i, c in enumerate(clients):
        _, u = s.client_round(server, ClientState(), c, np.random.default_rng(i))
        assert set(u.tensors) == {"ncm.class_sum", "ncm.class_count"}
        updates.append(u)
    server = s.aggregate(server, updates)
    h = np.concatenate([features(server.params, c.x_train) for c in clients])
    y = np.concatenate([c.y_train for c in clients])
    means = np.stack([h[y == k].mean(axis=0) for k in range(3)])
    nearest = np.argmin(((h[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    logits = h @ server.params["classifier.w"] + server.params["classifier.b"]
    np.testing.assert_array_equal(np.argmax(logits, axis=1), nearest)


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'.*ditto"):
        make_strategy("fedsgd", HEAD)


def test_split_strategies_need_an_adapter() -> None:
    with pytest.raises(ValueError, match="adapter"):
        make_strategy("fedper", HeadConfig(6, 3, adapter_dim=0)).shared_keys


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_upload_shapes_match_what_clients_actually_send(name: str) -> None:
    s = make_strategy(name, HEAD)
    server = s.init_server(np.random.default_rng(0))
    for _ in range(2):
        _, u = s.client_round(server, s.init_client(np.random.default_rng(1)), _client(1), np.random.default_rng(2))
        if u is None:
            assert s.upload_shapes(server) == {}
        else:
            assert {k: v.shape for k, v in u.tensors.items()} == s.upload_shapes(server)
            server = s.aggregate(server, [u])
