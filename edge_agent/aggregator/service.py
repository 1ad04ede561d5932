"""The aggregator service: the MQTT shell around the round state machine, the strategy and the store.

Everything that decides is pure (rounds.py, the strategy); everything that must survive a crash is in
the store; this loop only moves messages. Updates are acknowledged to the broker (manual PUBACK) only
after the store committed them, so a crash between receipt and commit makes the broker redeliver.

With `[signing]` configured, round tasks and global models go out signed with the fleet key, and an update
counts only if it is signed by a key enrolled for the device its topic names (keys.KeyRegistry, rescanned
when the registry directory changes). The signature is checked before the envelope is parsed.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..codec.chunking import ChunkError, Reassembler, parse_chunk
from ..codec.envelope import EnvelopeError, Kind, decode_envelope
from ..codec.signing import Purpose, Refusal, context, key_id, signer, verify
from ..config import AggregatorConfig, ConfigError
from ..faults import crash_point
from ..fleet import GlobalModel, RoundTask, Signer, encode_global, encode_task
from ..keys import KeyFileError, KeyRegistry, load_private_key
from ..learning import rng
from ..learning.head import HeadConfig
from ..learning.strategies import ClientUpdate, ServerState, make_strategy
from ..messaging import BrokerLink, ConnectionEvent, LinkFactory, Message, MqttError
from ..protocol import Topics
from ..transport import MqttLink
from . import rounds
from .metrics import Metrics, PrometheusMetrics, judge_reason
from .presence import PresenceLog
from .rounds import Outcome, Phase, RoundConfig, RoundState
from .store import AggregatorStore
from .view import FleetView
from .web import StatusServer

log = logging.getLogger("edge_fl.aggregator")
CHUNK_MAGIC = b"EFLC"


@dataclass
class RoundCounters:
    rejected: int = 0
    duplicates: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: list[str] = field(default_factory=list)


class AggregatorService:
    def __init__(self, cfg: AggregatorConfig, *, link_factory: LinkFactory = MqttLink,
                 clock: Callable[[], float] = time.time) -> None:
        """With `cfg.http` set, the service also serves its status page and Prometheus metrics there (from
        `start()` on); otherwise it records no metrics and imports no prometheus-client."""
        self.cfg = cfg
        self.clock = clock
        self.topics = Topics(cfg.fleet_name)
        self.head = HeadConfig(cfg.embedding_dim, cfg.num_classes, cfg.train.adapter_dim)
        self.strategy = make_strategy(cfg.train.strategy, self.head, cfg.train.strategy_config())
        self.round_config = RoundConfig(min_clients=cfg.fleet.min_clients, fraction=cfg.train.fraction,
                                        deadline_s=cfg.fleet.deadline_s, rounds=cfg.train.rounds,
                                        expects_updates=bool(self.strategy.shared_keys))
        self.store = AggregatorStore(cfg.state)
        self.store.check_fingerprint({"strategy": cfg.train.strategy, "head": asdict(self.head),
                                      "seed": cfg.train.seed, "fleet": cfg.fleet_name})
        latest = self.store.latest_global()
        if latest is None:
            server = self.strategy.init_server(rng.server_init(cfg.train.seed))
            self.store.save_global(0, server.params)
            latest = (0, server.params)
        self.server = ServerState(latest[0], latest[1])
        self.state: RoundState | None = self.store.current_round()
        self.acc = self.strategy.start_aggregation(self.server)
        if self.state is not None and self.state.phase is Phase.COLLECTING:
            saved = self.store.accumulator(self.state.round)
            if saved is not None:
                self.acc = type(self.acc).from_arrays(saved)
            log.info("resuming round %d: %d update(s) already counted", self.state.round, len(self.state.accepted))
        self.online: set[str] = set()
        self.presence_log = PresenceLog(log, clock)
        self.lost_at: float | None = None  # monotonic time the broker connection was lost
        self.metrics: Metrics = PrometheusMetrics() if cfg.http else Metrics()
        self.metrics.model_version(self.server.version)
        self.view = FleetView(cfg.fleet_name, clock, history=self.store.history())
        self.view.model_version(self.server.version)
        if self.state is not None:
            self.metrics.round_resumed(self.state.round)
            if self.state.phase is Phase.COLLECTING:
                self.view.round_opened(self.state.round, self.state.model_version, len(self.state.selected),
                                       self.state.opened_at, self.state.deadline, len(self.state.accepted))
        self.http: StatusServer | None = None
        self.started = False
        self.counters = RoundCounters()
        self.reassembler = Reassembler(max_message_bytes=cfg.fleet.max_update_bytes, max_pending=256)
        self.held: dict[bytes, list[Message]] = {}  # chunk messages acknowledged once their message is handled
        b = cfg.broker
        self.link: BrokerLink = link_factory(
            "edge-fl-aggregator-" + cfg.fleet_name, b.host, b.port, username=b.username, password=b.secret(),
            clean_start=False, max_payload_bytes=b.max_payload_bytes, manual_ack=True, receive_maximum=256,
            keepalive_s=b.keepalive_s, tls=b.tls.options())
        self.done = threading.Event()
        self.last_status: bytes | None = None
        s = cfg.signing
        self.sign_task: Signer | None = None
        self.sign_model: Signer | None = None
        self.registry: KeyRegistry | None = None  # None: signatures off (development)
        self.update_context = context(Purpose.UPDATE, cfg.fleet_name)
        self.require_signatures = bool(s.key) and s.required
        if s.key and s.registry:
            try:
                fleet_key = load_private_key(s.key)
                self.registry = KeyRegistry(s.registry)
            except KeyFileError as exc:
                raise ConfigError(f"[signing]: {exc}") from None
            self.sign_task = signer(fleet_key, context(Purpose.TASK, cfg.fleet_name))
            self.sign_model = signer(fleet_key, context(Purpose.MODEL, cfg.fleet_name))
            log.info("signatures on: tasks and models signed with fleet key %s; updates %s, checked against %d "
                     "enrolled device(s) in %s", key_id(fleet_key.public_key()),
                     "must be signed" if s.required else "signed or (migration) unsigned", len(self.registry),
                     s.registry)

    # --- publishing ----------------------------------------------------------------------------
    def model(self) -> GlobalModel:
        return GlobalModel(self.server.version, self.cfg.train, self.head, self.server.params)

    def _publish_retained(self, topic: str, payload: bytes, *, expiry_s: int | None = None) -> bool:
        """Retained state: if the broker is away now, it is published again on reconnection."""
        try:
            self.link.publish(topic, payload, qos=1, retain=True, expiry_s=expiry_s)
            return True
        except MqttError as exc:
            log.warning("could not publish %s now (%s); it is published again when the broker is back", topic, exc)
            return False

    def publish_model(self) -> None:
        payload = encode_global(self.model(), self.sign_model)
        if self._publish_retained(self.topics.model_current, payload):
            self.counters.bytes_out += len(payload)

    def publish_task(self) -> None:
        assert self.state is not None
        # "*" when every online device is selected (the default): a list of a thousand ids would not fit the
        # envelope's 8 KB meta strings. A sampled round lists its devices (up to ~700 short ids).
        everyone = set(self.state.selected) >= self.online
        task = RoundTask(self.state.round, self.state.deadline, None if everyone else self.state.selected, self.model())
        # The broker drops the retained task at its deadline: a device that connects later finds no stale
        # round to train for (the next task replaces it anyway).
        expiry = max(1, math.ceil(self.state.deadline - self.clock()))
        payload = encode_task(task, self.sign_task)
        if self._publish_retained(self.topics.round_current, payload, expiry_s=expiry):
            self.counters.bytes_out += len(payload) * len(self.state.selected)
        log.info("round %d open: %d device(s) selected, deadline in %.0f s, training from version %d",
                 self.state.round, len(self.state.selected), self.state.deadline - self.clock(), self.server.version)

    # --- rounds --------------------------------------------------------------------------------
    def rounds_opened(self) -> int:
        return 0 if self.state is None else self.state.round

    def maybe_open(self) -> None:
        if self.state is not None and self.state.phase is Phase.COLLECTING:
            return
        if self.rounds_opened() >= self.round_config.rounds:
            return
        if len(self.online) < self.cfg.fleet.expected_clients:
            return
        nxt = self.rounds_opened() + 1
        selected = rounds.select_devices(sorted(self.online), self.round_config.fraction,
                                         rng.selection(self.cfg.train.seed, nxt))
        self.state = rounds.open_round(nxt, self.server.version, selected, self.clock(), self.round_config)
        self.store.open_round(self.state)
        self.acc = self.strategy.start_aggregation(self.server)
        self.counters = RoundCounters()
        self.metrics.round_opened(nxt)
        self.view.round_opened(nxt, self.state.model_version, len(selected), self.state.opened_at, self.state.deadline)
        self.publish_task()

    def maybe_close(self) -> None:
        if self.state is None or not rounds.should_close(self.state, self.clock(), self.round_config):
            return
        closed, failures, ok = rounds.close(self.state, self.round_config)
        t0 = self.state.opened_at
        if ok:
            self.server = self.strategy.finish_aggregation(self.server, self.acc, failures)
            self.store.close_round(closed, failures, True, self.server.version, self.server.params, self.clock(),
                                   self._traffic())
        else:
            self.store.close_round(closed, failures, False, None, None, self.clock(), self._traffic())
            log.warning("round %d failed: %d update(s), at least %d needed; the global head stays at version %d",
                        closed.round, len(closed.accepted), self.round_config.min_clients, self.server.version)
        self.state = closed
        self.metrics.round_closed(ok, self.clock() - t0)
        self.metrics.model_version(self.server.version)
        self.view.model_version(self.server.version)
        self.view.round_closed(self.store.history(1)[-1])
        for f in failures:
            log.warning("round %d: %s sent no update (%s)", closed.round, f.client_id, f.reason)
        if ok:
            self.publish_model()
        status = {"round": closed.round, "model_version": self.server.version, "succeeded": ok,
                  "reporting": len(closed.accepted), "selected": len(closed.selected), "failed": len(failures),
                  "rejected": self.counters.rejected, "duplicates": self.counters.duplicates,
                  "bytes_in": self.counters.bytes_in, "bytes_out": self.counters.bytes_out,
                  "duration_s": round(self.clock() - t0, 3), "last": closed.round >= self.round_config.rounds}
        self.last_status = json.dumps(status).encode()
        self._publish_retained(self.topics.status, self.last_status)
        log.info("round %d closed: %d/%d reported, %d rejected, %d duplicate(s), %d B in; global version %d",
                 closed.round, len(closed.accepted), len(closed.selected), self.counters.rejected,
                 self.counters.duplicates, self.counters.bytes_in, self.server.version)
        if closed.round >= self.round_config.rounds:
            self._publish_retained(self.topics.round_current, b"")  # clears the retained task
            log.info("all %d rounds done", self.round_config.rounds)
            self.done.set()
        self.maybe_open()

    def _traffic(self) -> dict[str, int]:
        c = self.counters
        return {"bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "rejected": c.rejected, "duplicates": c.duplicates}

    # --- ingest --------------------------------------------------------------------------------
    def reject(self, what: str, reason: str) -> None:
        """Refuse an update; `reason` is its metrics label (metrics.REJECTION_REASONS)."""
        self.counters.rejected += 1
        self.metrics.update_rejected(reason)
        log.warning("rejected %s", what)

    def on_update_message(self, msg: Message) -> None:
        device = self.topics.device_of(msg.topic, "update") or "?"
        self.counters.bytes_in += len(msg.payload)
        self.metrics.bytes_received(len(msg.payload))
        if msg.payload[:4] == CHUNK_MAGIC:
            try:
                header, _ = parse_chunk(msg.payload)
                whole = self.reassembler.feed(msg.payload, self.clock())
            except ChunkError as exc:
                self.reject(f"a malformed chunk on {msg.topic}: {exc}", "malformed_chunk")
                self.link.ack(msg)
                return
            self.held.setdefault(header.message_id, []).append(msg)
            if whole is None:
                return
            self.ingest(whole, msg.topic, device)
            for held in self.held.pop(header.message_id, []):
                self.link.ack(held)
            return
        self.ingest(msg.payload, msg.topic, device)
        self.link.ack(msg)

    def check_signature(self, payload: bytes, topic: str, device: str) -> bool:
        """Is the update signed by a key enrolled for `device` (the one its topic names)? Rejects it if not."""
        if self.registry is None:
            return True
        verdict = verify(payload, self.registry.keys_for(device), self.update_context)
        if verdict.ok or (verdict.refusal is Refusal.UNSIGNED and not self.require_signatures):
            return True
        if verdict.refusal is Refusal.MALFORMED:
            return True  # not an envelope at all: decode_envelope names what is wrong
        refusal = verdict.refusal
        assert refusal is not None
        what = {Refusal.UNSIGNED: "unsigned, and this fleet requires signatures",
                Refusal.UNKNOWN_SIGNER: f"device {device!r} is not enrolled (or was revoked) in "
                                        f"{self.registry.directory}",
                Refusal.WRONG_KEY: f"forged: not signed by the key enrolled for {device!r}",
                Refusal.TAMPERED: "tampered: changed after it was signed"}[refusal]
        self.reject(f"an update on {topic}: {what} ({verdict.detail})", refusal.value)
        return False

    def ingest(self, payload: bytes, topic: str, device: str) -> None:
        if len(payload) > self.cfg.fleet.max_update_bytes:
            self.reject(f"an oversized update on {topic}: {len(payload)} bytes, the limit is "
                        f"{self.cfg.fleet.max_update_bytes} (fleet.max_update_bytes)", "oversized")
            return
        if not self.check_signature(payload, topic, device):
            return
        try:
            env = decode_envelope(payload, max_bytes=self.cfg.fleet.max_update_bytes)
        except EnvelopeError as exc:
            self.reject(f"a malformed update on {topic} (device {device}): {exc}", "malformed")
            return
        if env.kind is not Kind.UPDATE or env.device_id != device:
            self.reject(f"update {env.update_id} on {topic}: kind {env.kind.name} from {env.device_id!r}; "
                        f"an update must be kind UPDATE from the device named in its topic", "wrong_sender")
            return
        verdict = rounds.judge(self.state, env, strategy=self.strategy.name,
                               expected=self.strategy.upload_shapes(self.server))
        if verdict.outcome is Outcome.DUPLICATE:
            self.counters.duplicates += 1
            self.metrics.update_duplicate()
            log.info("ignored a redelivery: %s", verdict.reason)
            return
        if verdict.outcome is Outcome.REJECTED:
            self.reject(verdict.reason, judge_reason(verdict.reason))
            return
        assert self.state is not None
        crash_point("aggregator.before_commit", env.round)
        update = ClientUpdate(dict(env.tensors), env.num_examples, self.strategy.shared_keys)
        self.strategy.add_update(self.server, self.acc, update)
        self.store.accept(self.state, env, self.acc.to_arrays(), self.clock())
        crash_point("aggregator.after_commit", env.round)  # counted, but the broker has no PUBACK yet
        self.state = rounds.accept(self.state, env)
        self.metrics.update_accepted()
        self.view.update_accepted(len(self.state.accepted))
        self.view.seen(env.device_id)
        log.info("accepted update %s from %s for round %d (%d/%d)", env.update_id, env.device_id, env.round,
                 len(self.state.accepted), len(self.state.selected))

    def on_presence(self, msg: Message) -> None:
        device = self.topics.device_of(msg.topic, "presence")
        if device is None:
            return
        online = msg.payload == b"online"
        if online != (device in self.online):
            if online:
                self.online.add(device)
            else:
                self.online.discard(device)
            self.presence_log.changed(device, online, len(self.online))
            self.metrics.devices_online(len(self.online))
        self.view.seen(device, online)
        self.link.ack(msg)

    def on_telemetry(self, msg: Message, device: str) -> None:
        """A device's accuracies under a global version: history for the operator, never used to decide."""
        self.link.ack(msg)
        try:
            doc = json.loads(msg.payload)
            version, n_test = doc["version"], doc["n_test"]
            accs = [doc.get("personal_acc"), doc.get("global_acc")]
            valid = (doc.get("device") == device and type(version) is int and type(n_test) is int and n_test >= 0
                     and all(a is None or (isinstance(a, (int, float)) and 0.0 <= a <= 1.0) for a in accs))
        except (ValueError, TypeError, KeyError):
            valid = False
        if not valid:
            log.warning("ignored malformed telemetry on %s (%d bytes)", msg.topic, len(msg.payload))
            return
        personal, glob = (None if a is None else float(a) for a in accs)
        self.store.record_telemetry(version, device, personal, glob, n_test, self.clock())
        self.view.telemetry(version, device, personal, glob, n_test)
        self.view.seen(device)

    def handle(self, msg: Message | ConnectionEvent) -> None:
        if isinstance(msg, ConnectionEvent):
            if msg.connected:
                if self.lost_at is None:
                    log.info("connected to the broker (%s)", msg.reason)
                else:
                    log.info("back on the broker after %.1f s (%s)", time.monotonic() - self.lost_at, msg.reason)
                    self.lost_at = None
                # A broker that crashed may have lost our retained messages: publish them again.
                self.publish_model()
                if self.state is not None and self.state.phase is Phase.COLLECTING:
                    self.publish_task()
                elif self.done.is_set():
                    self._publish_retained(self.topics.round_current, b"")
                if self.last_status:
                    self._publish_retained(self.topics.status, self.last_status)
            else:
                self.lost_at = time.monotonic()
                log.warning("lost the broker (%s); paho reconnects with backoff", msg.reason)
            return
        if self.topics.device_of(msg.topic, "update") is not None:
            self.on_update_message(msg)
        elif self.topics.device_of(msg.topic, "presence") is not None:
            self.on_presence(msg)
        elif (device := self.topics.device_of(msg.topic, "telemetry")) is not None:
            self.on_telemetry(msg, device)
        else:
            self.link.ack(msg)

    def start(self, timeout: float | None = None) -> None:
        """Connect (within `timeout`, default [broker] connect_timeout_s) and subscribe; messages then arrive in
        `self.link.inbox`."""
        self.started = True
        self.link.connect(timeout=self.cfg.broker.connect_timeout_s if timeout is None else timeout)
        self.link.subscribe(self.topics.update_filter, qos=1)
        self.link.subscribe(self.topics.presence_filter, qos=1)
        # QoS 0: telemetry is for the operator, never decides anything, and must not queue for an absent
        # aggregator in front of the updates (Mosquitto's queue limits would then drop updates first).
        self.link.subscribe(self.topics.telemetry_filter, qos=0)
        if self.cfg.http and self.http is None:
            self.http = StatusServer(self.cfg.http, self.view, self.metrics)
            self.http.start()
        log.info("aggregator up: strategy %s, %d rounds, waiting for %d device(s)", self.strategy.name,
                 self.round_config.rounds, self.cfg.fleet.expected_clients)

    def tick(self) -> None:
        """What time alone decides: give up on chunked messages that never completed, close a round whose
        deadline passed (or that is complete), open the next one."""
        for message_id in self.reassembler.expire(self.clock()):
            for held in self.held.pop(message_id, []):  # a message whose other chunks never came
                self.link.ack(held)
        if self.registry is not None:
            self.registry.refresh()  # enrolment and revocation without a restart (a stat per file, once a second)
        self.presence_log.flush()
        self.maybe_close()
        self.maybe_open()

    def shutdown(self) -> None:
        if self.http is not None:
            self.http.close()
        self.link.close()
        self.store.close()

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; calls `start()` unless the caller already did."""
        if not self.started:
            self.start()
        while not stop.is_set():
            try:
                self.handle(self.link.inbox.get(timeout=0.2))
            except queue.Empty:
                pass
            self.tick()
        self.shutdown()
