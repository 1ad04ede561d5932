"""End-to-end receipts against a real Mosquitto with broker_config/acl.example: a real agent (its own thread, its
own SQLite file, the real paho link) and this test in the aggregator's place, publishing the round task and the
receipts per the contract (edge_agent/receipts.py).

(1) without a receipt the agent sends the very same update again; (2) a receipt empties its outbox and stops the
resends, and only that device can read it; (3) an agent restarted with an unconfirmed update in its outbox sends
it again. No sleeps: each step waits on a message or a condition with a deadline.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.agent.store import AgentStore, OutboxItem
from edge_agent.broker import DEV_CONFIG, LocalBroker
from edge_agent.codec.envelope import decode_envelope
from edge_agent.config import AgentConfig, BrokerConfig, UploadConfig
from edge_agent.fleet import GlobalModel, RoundTask, encode_task
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.strategies import ClientData, make_strategy
from edge_agent.learning.training import TrainingConfig
from edge_agent.protocol import Topics
from edge_agent.receipts import Receipt, encode_receipt
from edge_agent.transport import Message, MqttLink

from .conftest import assert_inbox_empty, next_event, running

FLEET = "rcpt"
DEVICE, OTHER = "dev-1", "dev-2"
DIM, CLASSES = 8, 3
TOPICS = Topics(FLEET)


@pytest.fixture
def acl_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    """The development broker with the shipped ACL: device names are usernames, as in production."""
    conf = tmp_path / "acl.conf"
    conf.write_text(DEV_CONFIG.read_text() + f"\nacl_file {DEV_CONFIG.parent / 'acl.example'}\n")
    users = {u: secrets.token_urlsafe(12) for u in ("aggregator", DEVICE, OTHER)}
    with running(LocalBroker(config=conf, users=users), request) as b:
        yield b


@pytest.fixture
def connect(acl_broker: LocalBroker) -> Iterator[Callable[[str], MqttLink]]:
    links: list[MqttLink] = []

    def make(user: str) -> MqttLink:
        link = MqttLink(f"{user}-test", acl_broker.host, acl_broker.port, username=user,
                        password=acl_broker.users[user], reconnect_min_s=0.1, reconnect_max_s=0.5)
        links.append(link)
        link.connect(timeout=5)
        assert next_event(link).connected
        return link

    yield make
    for link in links:
        link.close()


def _data() -> ClientData:
    r = np.random.default_rng(0)
    y = np.arange(60) % CLASSES
    x = (r.normal(0, 1, (60, DIM)) + y[:, None]).astype(np.float32)
    return ClientData(x[:45], y[:45], x[45:], y[45:])


def _task(round_no: int = 1, retry_after_s: float = 0.0) -> bytes:
    training = TrainingConfig(strategy="fedavg", seed=0, adapter_dim=0)
    head = HeadConfig(DIM, CLASSES, 0)
    server = make_strategy("fedavg", head, training.strategy_config()).init_server(np.random.default_rng(0))
    model = GlobalModel(0, training, head, server.params)
    return encode_task(RoundTask(round_no, time.time() + 600, None, model, retry_after_s=retry_after_s))


@contextmanager
def running_agent(broker: LocalBroker, state: Path, timeout_s: float) -> Iterator[None]:
    """The real agent, run as `edge-fl agent` runs it, in a thread of its own (its SQLite connection is that
    thread's); the test looks at its outbox through a connection of its own."""
    cfg = AgentConfig(device_id=DEVICE, state_dir=str(state), fleet=FLEET,
                      broker=BrokerConfig(host=broker.host, port=broker.port, username=DEVICE,
                                          password=broker.users[DEVICE]),
                      upload=UploadConfig(receipt_timeout_s=timeout_s, max_receipt_timeout_s=timeout_s))
    stop, ready = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            agent = AgentService(cfg, FixedSource(_data(), "synthetic"))
            agent.start(timeout=10)
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)
            raise
        finally:
            ready.set()
        agent.run(stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(15) and not failed, failed
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "the agent did not stop"


def outbox(state: Path) -> list[OutboxItem]:
    store = AgentStore(state / "agent.db")
    try:
        return store.outbox(include_sent=True)
    finally:
        store.close()


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        threading.Event().wait(0.05)


def next_update(link: MqttLink, timeout: float = 15.0) -> Message:
    """The next update upload the aggregator's link receives (other traffic is skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = link.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no update arrived within {timeout} s")
        if isinstance(item, Message) and TOPICS.device_of(item.topic, "update") == DEVICE:
            return item


def no_update_within(link: MqttLink, seconds: float) -> None:
    """Nothing but other traffic for `seconds`: several receipt timeouts, so a resend would have shown."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = link.inbox.get(timeout=left)
        except queue.Empty:
            return
        assert not (isinstance(item, Message) and TOPICS.device_of(item.topic, "update") == DEVICE), \
            f"the agent sent its update again after the receipt: {item.topic}"


def aggregator(connect: Callable[[str], MqttLink], retry_after_s: float = 0.0) -> MqttLink:
    link = connect("aggregator")
    link.subscribe(TOPICS.update_filter, qos=1)
    assert link.publish(TOPICS.round_current, _task(retry_after_s=retry_after_s), qos=1, retain=True) < 0x80
    return link


def test_without_a_receipt_the_agent_sends_the_same_update_again(
        acl_broker: LocalBroker, connect: Callable[[str], MqttLink], tmp_path: Path) -> None:
    agg = aggregator(connect)
    with running_agent(acl_broker, tmp_path / "a", timeout_s=0.5):
        copies = [next_update(agg) for _ in range(3)]  # the first send, then two without a receipt
        [item] = outbox(tmp_path / "a")  # still waiting for the receipt, though the broker took every copy
    assert {c.payload for c in copies} == {item.payload}  # the very same bytes, so the same update id
    assert {decode_envelope(c.payload).update_id for c in copies} == {item.update_id}
    assert copies[0].topic == TOPICS.update(DEVICE, 1) and item.deadline is not None


def test_the_task_steers_when_the_agent_comes_back_over_its_own_timeout(
        acl_broker: LocalBroker, connect: Callable[[str], MqttLink], tmp_path: Path) -> None:
    agg = aggregator(connect, retry_after_s=5.0)  # this device comes back 5-10 s after a send, not 0.5 s
    with running_agent(acl_broker, tmp_path / "a", timeout_s=0.5):
        first = next_update(agg)
        no_update_within(agg, 3.0)  # six of its own timeouts: without the steer, three copies came by now
        [item] = outbox(tmp_path / "a")  # still unconfirmed: quiet by the task's word, not because it is done
    assert decode_envelope(first.payload).update_id == item.update_id


def test_a_receipt_empties_the_outbox_and_stops_the_resends_and_only_its_device_reads_it(
        acl_broker: LocalBroker, connect: Callable[[str], MqttLink], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl.agent")
    agg = aggregator(connect)
    snoop = connect(OTHER)  # another device, trying to read dev-1's receipts
    snoop.subscribe(f"edgefl/{FLEET}/receipt/#", qos=1)
    with running_agent(acl_broker, tmp_path / "a", timeout_s=0.5):
        first, again = next_update(agg), next_update(agg)  # resending: the receipt below is what stops it
        update_id = decode_envelope(first.payload).update_id
        assert decode_envelope(again.payload).update_id == update_id
        assert agg.publish(TOPICS.receipt(DEVICE), encode_receipt(Receipt(update_id, 1, "counted")), qos=1) < 0x80
        wait_for("the outbox to empty", lambda: outbox(tmp_path / "a") == [])
        no_update_within(agg, 3.0)  # six receipt timeouts
        # A receipt for what the outbox no longer holds (a copy for a resend), or garbage: ignored, no crash.
        agg.publish(TOPICS.receipt(DEVICE), encode_receipt(Receipt(update_id, 1, "counted")), qos=1)
        agg.publish(TOPICS.receipt(DEVICE), b"\xff not a receipt", qos=1)
        wait_for("the malformed receipt to be logged",
                 lambda: any("ignored a malformed receipt" in r.getMessage() for r in caplog.records))
    assert any(f"update {update_id} for round 1 counted by the aggregator" in r.getMessage() for r in caplog.records)
    assert_inbox_empty(snoop)  # the ACL: receipt/dev-1 is readable by dev-1 alone


def test_a_refusal_also_empties_the_outbox_with_a_warning(
        acl_broker: LocalBroker, connect: Callable[[str], MqttLink], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl.agent")
    agg = aggregator(connect)
    with running_agent(acl_broker, tmp_path / "a", timeout_s=30.0):
        update_id = decode_envelope(next_update(agg).payload).update_id
        refusal = Receipt(update_id, 1, "refused", "update for model version 0, the round trains version 1")
        agg.publish(TOPICS.receipt(DEVICE), encode_receipt(refusal), qos=1)
        wait_for("the outbox to empty", lambda: outbox(tmp_path / "a") == [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("REFUSED by the aggregator: update for model version 0" in m for m in warnings), warnings


def test_a_restarted_agent_sends_its_unconfirmed_update_again(
        acl_broker: LocalBroker, connect: Callable[[str], MqttLink], tmp_path: Path) -> None:
    agg = aggregator(connect)
    state = tmp_path / "a"
    # A timeout far beyond the test: the only way a second copy can come is the restart.
    with running_agent(acl_broker, state, timeout_s=600.0):
        first = next_update(agg)
        wait_for("the broker's PUBACK to be recorded", lambda: outbox(state) != [] and _sent(state))
    [item] = outbox(state)
    with running_agent(acl_broker, state, timeout_s=600.0):
        again = next_update(agg)
        assert again.payload == first.payload == item.payload  # not trained again: the same update, same id
        agg.publish(TOPICS.receipt(DEVICE), encode_receipt(Receipt(item.update_id, 1, "counted")), qos=1)
        wait_for("the outbox to empty", lambda: outbox(state) == [])


def _sent(state: Path) -> bool:
    store = AgentStore(state / "agent.db")
    try:
        return store.outbox() == []  # no unsent update: the one there was taken by the broker
    finally:
        store.close()
