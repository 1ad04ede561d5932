"""Fixtures for the serial-link tests: an emulated MCU on a pty (default) or a real board (--hil-port URL)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

SUBJECT = 7  # a federated client: the head is trained on this subject's train windows, streamed are its test windows
SPEEDUP = 10.0  # emulator windows every 50 ms instead of every 500 ms: keeps the run short


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded poll of a condition another thread changes (counters and device state have no event)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="session")
def hil_port(request: pytest.FixtureRequest) -> str | None:
    return request.config.getoption("--hil-port")


@pytest.fixture(scope="session")
def emulator(hil_port: str | None) -> Iterator[Any]:
    """The shared emulated MCU, or None when the tests run against a real board."""
    if hil_port is not None:
        yield None
        return
    from firmware_bridge.emulator import EmulatedMcu

    emu = EmulatedMcu.on_pty(subject=SUBJECT, speedup=SPEEDUP)
    yield emu
    emu.stop()


@pytest.fixture
def needs_emulator(emulator: Any) -> Any:
    if emulator is None:
        pytest.skip("needs the emulated MCU's internals (runs without --hil-port)")
    return emulator


@pytest.fixture(scope="session")
def port_url(emulator: Any, hil_port: str | None) -> str:
    return hil_port if emulator is None else emulator.port_url


@pytest.fixture
def link(port_url: str) -> Iterator[Any]:
    from firmware_bridge.link import SerialLink

    with SerialLink(port_url) as lk:
        lk.wait_peer_hello(5.0)  # the link announces itself on connect; the device answers
        yield lk


@dataclass(frozen=True)
class TrainedHead:
    int8: Any  # edge_agent Int8Head
    mean: np.ndarray
    std: np.ndarray
    blob: bytes


@pytest.fixture(scope="session")
def trained_head(embedded: Any) -> TrainedHead:
    """A head trained with edge_agent on the subject's real embeddings, quantized, as a blob."""
    from edge_agent.data.partition import PartitionConfig
    from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead, quantize_head
    from edge_agent.data.federated import federate
    from firmware_bridge.head_blob import encode_head

    data = federate(embedded, PartitionConfig())
    client = data.clients[data.client_ids.index(f"subject-{SUBJECT:02d}")]
    head = PersonalizationHead.initial(HeadConfig(data.embedding_dim, data.num_classes), np.random.default_rng(0))
    head = head.fit(client.x_train, client.y_train, FitConfig(epochs=10), np.random.default_rng(1))
    q = quantize_head(head.params)
    std = embedded.standardizer
    return TrainedHead(q, std.mean, std.std, encode_head(q, std.mean, std.std))


@pytest.fixture(scope="session")
def other_head(embedded: Any) -> TrainedHead:
    """A second, different head (another subject), to tell which head the device runs."""
    from edge_agent.data.partition import PartitionConfig
    from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead, quantize_head
    from edge_agent.data.federated import federate
    from firmware_bridge.head_blob import encode_head

    data = federate(embedded, PartitionConfig())
    client = data.clients[0]
    head = PersonalizationHead.initial(HeadConfig(data.embedding_dim, data.num_classes), np.random.default_rng(5))
    head = head.fit(client.x_train, client.y_train, FitConfig(epochs=2), np.random.default_rng(6))
    q = quantize_head(head.params)
    std = embedded.standardizer
    return TrainedHead(q, std.mean, std.std, encode_head(q, std.mean, std.std))
