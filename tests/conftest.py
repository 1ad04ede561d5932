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


def pytest_addoption(parser):  # type: ignore[no-untyped-def]
    parser.addoption("--hil-port", default=None, metavar="URL",
                     help="run the hil tests against a real board on this pyserial URL (default: an emulated MCU on a pty)")
