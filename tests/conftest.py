"""Shared fixtures: the real recordings, the real backbone, embeddings computed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# A private PostgreSQL (`postgres`, `pg_dsn`) for the tests of the shared aggregator store.
pytest_plugins = ["tests.pg_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "backbone_int8.tflite"


@pytest.fixture(scope="session")
def dataset():  # type: ignore[no-untyped-def]
    from edge_agent.data.watch import load_watch_dataset

    return load_watch_dataset()


@pytest.fixture(scope="session")
def windows(dataset):  # type: ignore[no-untyped-def]
    from edge_agent.data.windows import split_and_window

    return split_and_window(dataset)


@pytest.fixture(scope="session")
def backbone():  # type: ignore[no-untyped-def]
    from edge_agent.backbone import FrozenBackbone

    return FrozenBackbone(MODEL)


@pytest.fixture(scope="session")
def embedded(dataset, backbone, tmp_path_factory):  # type: ignore[no-untyped-def]
    from edge_agent.backbone import EmbeddingCache
    from edge_agent.data.federated import embed_dataset

    return embed_dataset(dataset, backbone, cache=EmbeddingCache(tmp_path_factory.mktemp("emb")))


@pytest.fixture(scope="session")
def watch_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The bundled recordings imported as a per-user dataset directory (docs/data-format.md). Read-only: a test
    that needs a broken or changed copy writes one of its own."""
    from edge_agent.data.importers import import_watch

    out = tmp_path_factory.mktemp("userdata") / "watch"
    import_watch(out)
    return out


@pytest.fixture(scope="session")
def features_dir(watch_dir, backbone, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The watch import embedded by the bundled backbone and written as kind=features; the card keeps the windows'
    rate, length and stride, so the time split locates the windows exactly as for the windows themselves."""
    from edge_agent.data.userdata import DatasetCard, UserData, load_user_dataset, write_user_dataset

    ds = load_user_dataset(watch_dir)
    users = [UserData(u.user_id, backbone.embed(u.x), u.y, u.t, u.session) for u in ds.users.values()]
    c = ds.card
    card = DatasetCard(name="watch-embeddings", description="the watch import, embedded by backbone_int8.tflite",
                       license=c.license, citation=c.citation, kind="features", class_names=c.class_names,
                       feature_dim=backbone.embedding_dim, sample_rate_hz=c.sample_rate_hz,
                       window_length=c.window_length, window_stride=c.window_stride, roles=c.roles)
    out = tmp_path_factory.mktemp("userdata") / "features"
    write_user_dataset(out, card, users)
    return out


def pytest_addoption(parser):  # type: ignore[no-untyped-def]
    parser.addoption("--hil-port", default=None, metavar="URL",
                     help="run the hil tests against a real board on this pyserial URL (default: an emulated MCU on a pty)")
