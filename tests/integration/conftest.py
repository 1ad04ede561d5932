"""Integration fixtures: a real Mosquitto per test, the way Mosquitto tests itself.

Each test gets its own broker on a free loopback port (never the system one on 1883); when a
test fails, the broker's log is printed with the failure.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from edge_agent.broker import BrokerError, LocalBroker, find_mosquitto
from edge_agent.transport import ConnectionEvent, Message, MqttLink

LinkFactory = Callable[..., MqttLink]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item so fixture teardown can tell whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerError as err:
        if os.environ.get("CI"):
            raise  # CI runs scripts/setup, which installs it: a missing broker is a failure
        pytest.skip(str(err))


@contextmanager
def running(b: LocalBroker, request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    """`b` started for one test, stopped after it, its log printed if the test failed."""
    _require_mosquitto()
    try:
        b.start()
        yield b
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            print(f"\n----- mosquitto log ({b.host}:{b.port}) -----\n{b.log()}")
        b.stop()


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    """A started LocalBroker with users ``aggregator`` and ``device``; its log on failure."""
    with running(LocalBroker(), request) as b:
        yield b


@pytest.fixture
def make_link(broker: LocalBroker) -> Iterator[LinkFactory]:
    """``make_link(user, client_id=None, connect=True, **kwargs)``: an MqttLink to ``broker``.

    Logs in as ``user`` with the broker's generated password, uses fast reconnects, and on
    connect consumes the initial ConnectionEvent. Every link is closed at teardown.
    """
    links: list[MqttLink] = []
    counter = iter(range(1_000_000))

    def factory(user: str = "device", client_id: str | None = None, *, connect: bool = True,
                **kwargs: Any) -> MqttLink:
        kwargs.setdefault("reconnect_min_s", 0.1)
        kwargs.setdefault("reconnect_max_s", 0.5)
        link = MqttLink(client_id or f"{user}-{next(counter)}", broker.host, broker.port,
                        username=user, password=broker.users.get(user), **kwargs)
        links.append(link)
        if connect:
            link.connect(timeout=5)
            event = next_event(link)
            assert event.connected, event
        return link

    yield factory
    for link in links:
        link.close()


def next_item(link: MqttLink, timeout: float = 5.0) -> Message | ConnectionEvent:
    """The next inbox item, or fail after ``timeout`` seconds."""
    try:
        return link.inbox.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{link!r}: nothing arrived within {timeout} s")


def next_message(link: MqttLink, timeout: float = 5.0) -> Message:
    """The next inbox item, which must be a Message."""
    item = next_item(link, timeout)
    assert isinstance(item, Message), f"expected a message, got {item}"
    return item


def next_event(link: MqttLink, timeout: float = 5.0) -> ConnectionEvent:
    """The next ConnectionEvent, skipping nothing: it must be the next item."""
    item = next_item(link, timeout)
    assert isinstance(item, ConnectionEvent), f"expected a connection event, got {item}"
    return item


def assert_inbox_empty(link: MqttLink) -> None:
    assert link.inbox.empty(), f"unexpected items: {list(link.inbox.queue)}"


class Stopwatch:
    """Elapsed seconds since creation (for the 'quickly' assertions)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0
