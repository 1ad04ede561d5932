"""The aggregator service: the MQTT shell around the round state machine, the strategy and the store.

Everything that decides is pure (rounds.py, the strategy); everything that must survive a crash is in
the store; this loop only moves messages. Updates are acknowledged to the broker (manual PUBACK) only
after the store committed them, so a crash between receipt and commit makes the broker redeliver. The
update messages already waiting are committed together (group commit, `serve`, up to BATCH_LIMIT): one
transaction and one accumulator snapshot per batch, never a wait for more.

What the process holds, at most (backpressure): QoS 1 messages (updates, chunks, presence) delivered and
not yet acknowledged should be bounded by the link's receive_maximum (256), the broker holding the rest
(Mosquitto's max_queued_messages / max_queued_bytes); Mosquitto 2.0.11 overruns it once acknowledgements flow,
up to what it queued for this session (see MAX_INBOX). So the inbox holds at most 256 x max_update_bytes of
QoS 1 payload; a batch at most BATCH_LIMIT updates; partial chunked messages fleet.max_partial_bytes
(ingest.ChunkIntake). Telemetry is QoS 0, outside that window: past QOS0_BACKLOG items waiting in the inbox
the link drops it (counted, logged; telemetry never decides anything). Per device, and so growing with the
fleet: the online set, the status page's device list, and the open round's accepted map (device -> update
id); the accumulator does not grow with the fleet for the mean, and holds every update for the stacked
robust rules (learning/robust.StackedUpdates).

With `[signing]` configured, round tasks and global models go out signed with the fleet key, and an update
counts only if it is signed by a key enrolled for the device its topic names (keys.KeyRegistry, rescanned
when the registry directory changes). The signature is checked before the envelope is parsed.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, TypeGuard, cast

import numpy as np

from ..codec.chunking import ChunkError, Reassembler
from ..codec.compression import CodecSpec
from ..codec.downlink import compress_version, model_digest
from ..codec.envelope import Envelope, EnvelopeError, Kind, decode_envelope
from ..codec.signing import Purpose, Refusal, context, key_id, signer, verify
from ..codec.update_frame import decode_update_frame, frame_seeds, is_update_frame
from ..config import AggregatorConfig, ConfigError
from ..faults import crash_point
from ..fleet import GlobalModel, RoundTask, Signer, encode_global, encode_task, update_base
from ..keys import KeyFileError, KeyRegistry, load_private_key
from ..learning import dp, rng, robust
from ..learning.aggregate import Sum, WeightedMean
from ..learning.head import HeadConfig
from ..learning.strategies import ClientFailure, ClientUpdate, ServerState, make_strategy
from ..learning.validate import HARD_MAX_ABS, expected_shapes, head_problem
from ..messaging import BrokerLink, ConnectionEvent, LinkFactory, Message, MqttError
from ..protocol import Topics
from ..receipts import Receipt, ReceiptError, encode_receipt
from ..transport import MqttLink
from . import downlink_store, privacy, rounds
from .ingest import ChunkIntake
from .metrics import Metrics, PrometheusMetrics, judge_reason
from .presence import PresenceLog
from .rounds import Outcome, Phase, RoundConfig, RoundState
from .store import AlreadyCounted, RoundNotCollecting, open_store

if TYPE_CHECKING:
    from .pgstore import PostgresStore
from .view import FleetView
from .web import StatusServer

log = logging.getLogger("edge_fl.aggregator")
MAX_NAMED_STRAGGLERS = 10  # per round; the rest are counted in one line
# Update messages per group commit: one fsync and one accumulator snapshot for up to this many. Far below the
# link's receive_maximum (256), so a full batch never waits on the broker's flow control.
BATCH_LIMIT = 32
# Telemetry (QoS 0) is dropped past this many waiting messages: what a flood can make the process hold is this
# many messages of at most the broker's packet limit, on top of the QoS 1 window (receive_maximum).
QOS0_BACKLOG = 256
# What the process holds of QoS 1 traffic should be bounded by Receive-Maximum (256); Mosquitto 2.0.11 does not
# keep to it once acknowledgements flow (transport.MqttLink, max_inbox), so the aggregator's inbox can hold up to
# its session's queue (max_queued_messages, broker_config/README.md). The link's own bound (max_inbox) is NOT
# used here yet: with it, an aggregator of 100,000 devices stalled in its second round, a wait not yet understood.
MAX_INBOX: int | None = None
CHUNK_MAGIC = b"EFLC"
# A worker of a shared store looks at it this often (has the coordinator moved on? is the coordinator's lock
# free? has the quorum reported?): one small query each, never per message.
POLL_S = 0.25
# A batch another worker overtook (it counted one of the batch's devices first, or the round closed) is judged
# again knowing what the store holds; past this many tries the error propagates (nothing acknowledged).
MAX_BATCH_TRIES = 3


class RoundMoved(Exception):
    """An update for a round this worker has not seen open yet (the coordinator opened it a moment ago)."""


@dataclass(frozen=True)
class Settled:
    """One update message's verdict, final once the batch that carries it is committed (`settle`)."""

    device: str  # as its topic names it
    update_id: str | None  # None: not a readable envelope (oversized, malformed, refused signature)
    round: int | None
    outcome: Outcome
    reason: str  # why it was rejected, or which update it duplicates; "" when accepted


@dataclass
class RoundCounters:
    rejected: int = 0
    duplicates: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class IngestBatch:
    """Updates judged since the last commit, and what to go back to if the batch fails before its commit."""

    state: RoundState | None  # the round before the batch
    norms: int  # len(round_norms) before it
    counts: int  # len(round_counts) before it
    counters: RoundCounters
    accepted: list[Envelope] = field(default_factory=list)  # stored by the batch's commit
    settled: list[Settled] = field(default_factory=list)  # one verdict per whole update judged


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
                                        expects_updates=bool(self.strategy.shared_keys),
                                        min_reported_fraction=cfg.fleet.min_reported_fraction)
        self.worker = cfg.worker or socket.gethostname()
        self.store = open_store(cfg.state, cfg.fleet_name, self.worker)
        # Several workers share a PostgreSQL store (pgstore.py): each ingests what the broker hands it; only the
        # coordinator opens, closes and publishes rounds; the others follow the store (`follow`).
        self.shared: PostgresStore | None = cast("PostgresStore", self.store) if self.store.shared else None
        self.next_poll = 0.0  # monotonic time a worker next looks at the shared store (POLL_S)
        self.retrying = False
        self.unpublished: dict[str, tuple[bytes, float | None]] = {}  # retained state to publish again (tick)
        self.store.check_fingerprint({"strategy": cfg.train.strategy, "head": asdict(self.head),
                                      "seed": cfg.train.seed, "fleet": cfg.fleet_name})
        # Announced in every task and model; no global model beyond it is published. Never above the bound every
        # device enforces whatever it is told (HARD_MAX_ABS): a model the whole fleet refuses would stall it.
        self.max_abs = min(cfg.aggregator.max_abs, HARD_MAX_ABS)
        self.refused_reason: str | None = None  # why the last round's new global model was not published
        self.downlink = CodecSpec.parse(cfg.train.downlink_codec) if cfg.train.downlink_codec else None
        latest = self.store.latest_global()
        if latest is None:
            server = self.strategy.init_server(rng.server_init(cfg.train.seed))
            self.store.save_global(0, server.params)
            latest = (0, server.params)
        self.server = ServerState(latest[0], latest[1])
        self.state: RoundState | None = None
        self.load_round()
        recovered = self.global_problem(self.server.params) is not None
        if recovered:
            self._recover_global()
        self.robust = cfg.aggregator
        # Bounded influence (learning/robust.py): the norms of recent accepted updates, kept with the state, give
        # the next round's norm bound; the rounds that added DP noise give the privacy budget spent.
        self.norm_history: list[float] = []
        self.count_history: list[int] = []
        self.norm_bound, self.count_cap = 0.0, 0
        self.dp_rounds = 0
        self.load_bounds()
        self.round_norms: list[float] = []  # the open round's accepted norms (durable in its accumulator)
        self.round_counts: list[int] = []  # ... and the example counts they claimed (capped at max_examples)
        self.acc = self.start_aggregation()
        if self.state is not None and self.state.phase is Phase.COLLECTING:
            self.load_accumulator()
            log.info("resuming round %d: %d update(s) already counted", self.state.round, len(self.state.accepted))
        self.online: set[str] = set()
        self.presence_log = PresenceLog(log, clock)
        self.lost_at: float | None = None  # monotonic time the broker connection was lost
        self.metrics: Metrics = PrometheusMetrics() if cfg.http else Metrics()
        if recovered:
            self.metrics.global_refused()
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
        self.last_rejection = ""  # what the latest rejection said (the verdict of the update being judged)
        # chunks are acknowledged at once: partial messages are held in bounded memory, never as unacked messages
        self.intake = ChunkIntake(cfg.fleet, self.metrics, clock)
        b = cfg.broker
        client_id = "edge-fl-aggregator-" + cfg.fleet_name + (f"-{self.worker}" if self.shared else "")
        self.link: BrokerLink = link_factory(
            client_id, b.host, b.port, username=b.username, password=b.secret(),
            clean_start=False, max_payload_bytes=b.max_payload_bytes, manual_ack=True, receive_maximum=256,
            keepalive_s=b.keepalive_s, tls=b.tls.options(), max_qos0_backlog=QOS0_BACKLOG, max_inbox=MAX_INBOX)
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

    # --- the global model's health ---------------------------------------------------------------
    def global_problem(self, params: dict[str, np.ndarray], version: int | None = None) -> str | None:
        """Why `params` must not be published as a global model (the check every device makes), or None."""
        what = f"global model version {self.server.version if version is None else version}"
        return head_problem(params, expected_shapes(self.head, self.strategy.shared_keys), max_abs=self.max_abs,
                            what=what)

    def _recover_global(self) -> None:
        """The stored latest global model fails the checks (written before they existed): publish the newest good
        one instead, as a NEW version (devices refuse an older version as a rollback), and abandon a round that
        trains from the bad one."""
        bad = self.server.version
        log.error("the stored %s; it is not published", self.global_problem(self.server.params))
        good: tuple[int, dict[str, np.ndarray]] | None = None
        for version in self.store.global_versions():
            try:
                params = self.store.global_at(version)
            except ValueError:  # an unreadable blob is as bad as a poisoned one
                continue
            if params is not None and self.global_problem(params, version) is None:
                good = (version, params)
                break
        if good is None:
            params = self.strategy.init_server(rng.server_init(self.cfg.train.seed)).params
            log.error("no stored global model passes the checks: starting again from the initial head")
        else:
            params = good[1]
        self.server = ServerState(bad + 1, params)
        self.store.save_global(self.server.version, params)
        log.warning("recovered: global version %d is %s again", self.server.version,
                    "the initial head" if good is None else f"version {good[0]}")
        if self.state is not None and self.state.phase is Phase.COLLECTING:
            closed = replace(self.state, phase=Phase.CLOSED)
            self.store.close_round(closed, [], False, None, None, self.clock())
            log.warning("round %d trained from the refused version %d: closed as failed", closed.round, bad)
            self.state = closed

    # --- bounded influence (learning/robust.py) ------------------------------------------------------------
    def start_aggregation(self) -> WeightedMean:
        """The strategy's accumulator, or every update kept for a rule that needs them all (trimmed mean,
        median); statistics (Sum: nearest-class-mean sums) always add up."""
        acc = self.strategy.start_aggregation(self.server)
        if self.robust.rule != "mean" and not isinstance(acc, Sum):
            return robust.StackedUpdates(self.robust.rule, self.robust.trim_fraction)
        return acc

    def load_round(self) -> None:
        """The newest round as the store holds it, with a sampled round's rule (derived again, not stored)."""
        self.state = self.store.current_round()
        if self.state is not None and self.state.phase is Phase.COLLECTING and self.cfg.train.fraction < 1.0:
            salt = rounds.round_salt(rng.selection(self.cfg.train.seed, self.state.round))
            self.state = replace(self.state, rule=rounds.rule_for(self.state.selected, salt))

    def load_bounds(self) -> None:
        """The bounds' history and the privacy budget spent, as the last closed round stored them."""
        self.set_bounds_history(json.loads(self.store.read_meta("norm_history") or "[]"),
                                json.loads(self.store.read_meta("count_history") or "[]"))
        self.dp_rounds = int(self.store.read_meta("dp_rounds") or 0)

    def set_bounds_history(self, norms: list[float], counts: list[int]) -> None:
        """The recent accepted norms and example counts, and the bounds they give every update of the next
        round: computed here, once a round, not per update (learning/robust.py adaptive_bound, count_cap). The
        norm bound is fixed (the ceiling) with differential privacy, whose sensitivity it is."""
        window = self.robust.clip_window
        self.norm_history, self.count_history = norms[-window:], counts[-window:]
        self.norm_bound = (self.robust.clip_ceiling if self.robust.dp
                           else robust.adaptive_bound(self.norm_history, self.robust))
        self.count_cap = robust.count_cap(self.count_history, self.robust)

    def bounds(self) -> dict[str, str | int | float]:
        """What the task announces: how this round weighs, bounds and combines updates."""
        r = self.robust
        out: dict[str, str | int | float] = {"rule": r.rule, "weighting": r.weighting, "max_examples": self.count_cap,
                                             "max_abs": r.max_abs, "clip": r.clip}
        if r.rule == "trimmed-mean":
            out["trim_fraction"] = r.trim_fraction
        if r.clip != "off":
            out["norm_bound"] = self.norm_bound
        if r.dp:
            out["noise_multiplier"] = r.noise_multiplier
        return out

    def bound_update(self, tensors: Mapping[str, np.ndarray], num_examples: int,
                     who: str) -> tuple[dict[str, np.ndarray], int, float | None] | None:
        """(tensors, weight, norm of its change) as the server allows them, or None when rejected."""
        r = self.robust
        weight = r.weight(num_examples, self.count_cap)
        if weight < min(int(num_examples), r.max_examples) and r.weighting == "count":
            log.info("%s: claims %d examples, counts for %d (count_factor x the fleet's median count)", who,
                     num_examples, weight)
        stats = isinstance(self.acc, Sum)  # class statistics: sums, not weights; only finiteness applies
        problem = robust.out_of_range(tensors, math.inf if stats else r.max_abs)
        if problem is not None:
            self.reject(f"{who}: {problem} ([aggregator] max_abs)", "out_of_range")
            return None
        if stats or not set(tensors) <= set(self.server.params):
            return dict(tensors), weight, None
        bound = self.norm_bound
        if r.clip == "clip":
            clipped, norm = robust.clip_update(tensors, self.server.params, bound)
            if norm > bound:
                self.metrics.update_clipped()
                log.info("%s: change of norm %.3g clipped to the bound %.3g", who, norm, bound)
            return clipped, weight, norm
        norm = robust.delta_norm(tensors, self.server.params)
        if r.clip == "reject" and norm > bound:
            self.reject(f"{who}: its change to the global head has norm {norm:.3g}, beyond this round's bound "
                        f"{bound:.3g} ([aggregator] clip)", "norm_too_large")
            return None
        return dict(tensors), weight, norm

    def add_privacy_noise(self, candidate: ServerState) -> ServerState:
        """With differential privacy on, the new global head with Gaussian noise (learning/dp.py)."""
        if not self.robust.dp or isinstance(self.acc, Sum) or not self.acc.count:
            return candidate
        keys = set(self.acc.result())
        noisy = dp.add_noise(candidate.params, keys, self.robust.noise_multiplier, self.norm_bound, self.acc.count,
                             np.random.default_rng())  # fresh OS entropy: noise an observer cannot replay
        return replace(candidate, params=noisy)

    def bounds_state_after_round(self) -> dict[str, str]:
        """The norm history and the count of noisy rounds, committed with the round that changes them."""
        self.set_bounds_history(self.norm_history + self.round_norms, self.count_history + self.round_counts)
        if self.robust.dp and not isinstance(self.acc, Sum) and self.acc.count:
            self.dp_rounds += 1
        return {"norm_history": json.dumps(self.norm_history), "count_history": json.dumps(self.count_history),
                "dp_rounds": str(self.dp_rounds)}

    def bounds_status(self) -> dict[str, object]:
        """For the round's status document, log and metrics: the next bound and the privacy budget spent."""
        out: dict[str, object] = {"rule": self.robust.rule}
        if self.robust.weighting == "count":
            out["count_cap"] = self.count_cap
        if self.robust.clip != "off":
            out["norm_bound"] = round(self.norm_bound, 6)
            self.metrics.norm_bound(self.norm_bound)
        if self.robust.dp:
            eps = privacy.epsilon(self.robust.noise_multiplier, self.round_config.fraction, self.dp_rounds,
                             self.robust.dp_delta)
            out.update({"dp_epsilon": round(eps, 4), "dp_delta": self.robust.dp_delta, "dp_rounds": self.dp_rounds})
            self.metrics.dp_epsilon(eps)
            log.info("privacy budget after %d noisy round(s): epsilon %.3f at delta %g", self.dp_rounds, eps,
                     self.robust.dp_delta)
        return out

    # --- publishing ----------------------------------------------------------------------------
    def model(self) -> GlobalModel:
        return GlobalModel(self.server.version, self.cfg.train, self.head, self.server.params, self.max_abs)

    def retry_retained(self) -> None:
        """Publish again what could not be published (a full client queue, a broker away): from `tick`, so the
        fleet's task, model and status never wait for a reconnection that may not come."""
        now = self.clock()
        for topic, (payload, expires_at) in list(self.unpublished.items()):
            if expires_at is not None and expires_at <= now:
                del self.unpublished[topic]  # a task past its deadline: nothing to announce any more
                continue
            expiry = None if expires_at is None else max(1, math.ceil(expires_at - now))
            if not self._publish_retained(topic, payload, expiry_s=expiry):
                return  # still failing: the rest waits for the next tick too

    def _publish_retained(self, topic: str, payload: bytes, *, expiry_s: int | None = None) -> bool:
        """Retained state: if the broker is away now, it is published again on reconnection. Not waited for:
        the PUBACK can only be read past every update the broker queued before it (a wait here timed out after
        10 s at 100,000 devices, and the round's model went out only on the next reconnection). A refusal is
        logged when its PUBACK comes."""
        try:
            self.link.publish_nowait(topic, payload, qos=1, retain=True, expiry_s=expiry_s)
        except MqttError as exc:
            if topic not in self.unpublished:  # one line per topic, not one per retry
                log.warning("could not publish %s now (%s); trying again every tick", topic, exc)
            self.unpublished[topic] = (payload, None if expiry_s is None else self.clock() + expiry_s)
            return False
        if self.unpublished.pop(topic, None) is not None:
            log.info("published %s after all", topic)
        return True

    def publish_model(self, *, every_delta: bool = False) -> None:
        """The whole model on model/current, and with a downlink codec the delta that gives it (`every_delta`: the
        deltas of every version kept, after a reconnection or a change of coordinator)."""
        payload = encode_global(self.model(), self.sign_model)
        if self._publish_retained(self.topics.model_current, payload):
            self.counters.bytes_out += len(payload)
        if self.downlink is None:
            return
        version, keep = self.server.version, self.cfg.fleet.downlink_keep
        frames = downlink_store.kept_frames(self.store.read_meta, version, keep)
        for v, frame in sorted(frames.items()):
            if every_delta or v == version:
                self._publish_retained(self.topics.model_delta(v), frame)
        if version - keep >= 1:  # the oldest no longer kept: a device that far behind reads model/current
            self._publish_retained(self.topics.model_delta(version - keep), b"")

    # --- the global model on its way down (codec/downlink.py) ------------------------------------
    def compress_downlink(self, candidate: ServerState) -> tuple[ServerState, dict[str, str]]:
        """With a downlink codec: the new version as devices will hold it (the last one plus its compressed
        change, the rest kept as the residual), and the meta that stores the residual and the delta frame with
        the round's close. Without one, or when the tensors changed: `candidate` as it is, with no delta."""
        if self.downlink is None:
            return candidate, {}
        residual = downlink_store.decode_residual(self.store.read_meta(downlink_store.RESIDUAL_KEY),
                                                  self.server.version)
        step = compress_version(self.server.params, candidate.params, residual, self.downlink,
                                version=candidate.version, sign=self.sign_model)
        if step is None:
            log.warning("global version %d holds other tensors than version %d: it goes down whole, devices resync "
                        "from %s", candidate.version, self.server.version, self.topics.model_current)
            return candidate, {downlink_store.RESIDUAL_KEY: ""}
        keep = self.cfg.fleet.downlink_keep
        return replace(candidate, params=step.params), {
            downlink_store.RESIDUAL_KEY: downlink_store.encode_residual(step.version, step.residual),
            downlink_store.frame_key(step.version, keep): downlink_store.encode_frame(step.frame)}

    def publish_task(self) -> None:
        assert self.state is not None
        # "*" when every online device is selected (the default): a list of a thousand ids would not fit the
        # envelope's 8 KB meta strings. A sampled round lists its devices (up to ~700 short ids).
        # A sampled round goes out as a constant-size hash rule (fleet.SelectionRule), never as a list of ids:
        # the envelope's meta strings are limited to 8 KB, a few hundred ids. "*" when every online device is in.
        everyone = set(self.state.selected) >= self.online
        rule = None
        if not everyone:
            rule = self.state.rule or rounds.rule_for(
                self.state.selected, rounds.round_salt(rng.selection(self.cfg.train.seed, self.state.round)))
        task = RoundTask(self.state.round, self.state.deadline, None, self.model(), self.bounds(), rule,
                         rounds.quorum(self.state, self.round_config), upload_window_s=self.cfg.fleet.upload_window_s,
                         retry_after_s=self.cfg.fleet.retry_after_s,
                         model_digest=None if self.downlink is None else model_digest(self.server.params),
                         downlink_keep=self.cfg.fleet.downlink_keep)
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
        selected, rule = rounds.draw(sorted(self.online), self.round_config.fraction,
                                     rng.selection(self.cfg.train.seed, nxt), self.store.reliability())
        self.state = rounds.open_round(nxt, self.server.version, selected, self.clock(), self.round_config, rule)
        self.store.open_round(self.state)
        self.acc = self.start_aggregation()
        self.round_norms = []
        self.round_counts = []
        self.counters = RoundCounters()
        self.metrics.round_opened(nxt)
        self.view.round_opened(nxt, self.state.model_version, len(selected), self.state.opened_at, self.state.deadline)
        self.publish_task()

    def maybe_close(self) -> None:
        if self.state is None or self.state.phase is not Phase.COLLECTING:
            return
        if self.shared is None:
            if rounds.should_close(self.state, self.clock(), self.round_config):
                outcome = self.close_round()
                crash_point("aggregator.after_close", outcome[0].round)  # stored, not published yet
                self.announce(*outcome)
            return
        _, reported = self.shared.round_progress(self.state.round)  # every worker's count, not this one's
        if not rounds.should_close(self.state, self.clock(), self.round_config, reported):
            return
        try:
            with self.shared.closing(self.state.round) as (accepted, merged):
                self.state = replace(self.state, accepted=accepted)
                self.adopt_accumulator(merged)
                outcome = self.close_round()
        except RoundNotCollecting as exc:  # closed by another coordinator: this one lost its lock
            log.warning("%s; following the store", exc)
            self.follow(force=True)
            return
        crash_point("aggregator.after_close", outcome[0].round)  # committed, not published yet
        self.announce(*outcome)  # published only once the close is committed

    def close_round(self) -> tuple[RoundState, list[ClientFailure], bool, float]:
        """Close the open round: aggregate, store the result (a shared store: in the caller's transaction).
        Returns (the closed round, its stragglers, whether it succeeded, when it opened) for `announce`."""
        assert self.state is not None
        closed, failures, ok = rounds.close(self.state, self.round_config)
        t0 = self.state.opened_at
        self.refused_reason = None
        downlink_meta: dict[str, str] = {}
        if ok:
            candidate = self.add_privacy_noise(self.strategy.finish_aggregation(self.server, self.acc, failures))
            candidate, downlink_meta = self.compress_downlink(candidate)
            self.refused_reason = self.global_problem(candidate.params, candidate.version)
            ok = self.refused_reason is None
        if ok:
            self.server = candidate
            self.store.close_round(closed, failures, True, self.server.version, self.server.params, self.clock(),
                                   self._traffic(), {**self.bounds_state_after_round(), **downlink_meta})
        elif self.refused_reason is not None:  # never published: every device would refuse it, or worse, use it
            self.store.close_round(closed, failures, False, None, None, self.clock(), self._traffic())
            self.metrics.global_refused()
            log.error("round %d failed: the new %s; not published, the global head stays at version %d",
                      closed.round, self.refused_reason, self.server.version)
        else:
            self.store.close_round(closed, failures, False, None, None, self.clock(), self._traffic())
            log.warning("round %d failed: %d update(s), at least %d needed; the global head stays at version %d",
                        closed.round, len(closed.accepted), self.round_config.min_clients, self.server.version)
        self.state = closed
        if self.round_config.expects_updates:  # who reported when selected: the next draws leave out ghosts
            self.store.record_reliability({d: d in closed.accepted for d in closed.selected}, self.clock())
        self.metrics.round_closed(ok, self.clock() - t0)
        self.metrics.model_version(self.server.version)
        self.view.model_version(self.server.version)
        self.view.round_closed(self.store.history(1)[-1])
        return closed, failures, ok, t0

    def announce(self, closed: RoundState, failures: list[ClientFailure], ok: bool, t0: float) -> None:
        """Tell the fleet and the operator how a closed round ended, and open the next one."""
        # Name a few stragglers, then count the rest: a fleet with hundreds of absent devices must not flood the log.
        for f in failures[:MAX_NAMED_STRAGGLERS]:
            log.warning("round %d: %s sent no update (%s)", closed.round, f.client_id, f.reason)
        if len(failures) > MAX_NAMED_STRAGGLERS:
            log.warning("round %d: and %d more selected device(s) sent no update", closed.round,
                        len(failures) - MAX_NAMED_STRAGGLERS)
        if ok:
            self.publish_model()
        status: dict[str, object] = {"round": closed.round, "model_version": self.server.version, "succeeded": ok,
                  "reporting": len(closed.accepted), "selected": len(closed.selected), "failed": len(failures),
                  "rejected": self.counters.rejected, "duplicates": self.counters.duplicates,
                  "bytes_in": self.counters.bytes_in, "bytes_out": self.counters.bytes_out,
                  "duration_s": round(self.clock() - t0, 3), "last": closed.round >= self.round_config.rounds}
        if self.refused_reason is not None:
            status["refused"] = self.refused_reason
        status.update(self.bounds_status())
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

    @property
    def reassembler(self) -> Reassembler:
        """The partial chunked messages held (for tests and the status of a running aggregator)."""
        return self.intake.reassembler

    # --- ingest --------------------------------------------------------------------------------
    # Group commit: the update messages already waiting are judged and accumulated in memory, then ONE
    # transaction stores every accepted row and one snapshot of the accumulator, then every message of the
    # batch is acknowledged. A crash before the commit leaves none of the batch counted and all of it
    # unacknowledged (the broker redelivers); after it, all of it is counted and redeliveries are duplicates.
    def reject(self, what: str, reason: str) -> None:
        """Refuse an update; `reason` is its metrics label (metrics.REJECTION_REASONS)."""
        self.counters.rejected += 1
        self.metrics.update_rejected(reason)
        self.last_rejection = what
        log.warning("rejected %s", what)

    def is_update(self, item: Message | ConnectionEvent) -> TypeGuard[Message]:
        return isinstance(item, Message) and self.topics.device_of(item.topic, "update") is not None

    def serve(self, first: Message | ConnectionEvent) -> None:
        """Handle `first` and, when it is an update, the updates already waiting behind it (up to BATCH_LIMIT) as
        one group commit. Never waits for more: a lone update is committed at once. An item that is not an
        update ends the batch and is handled after the batch's commit, so the inbox's order is kept."""
        if not self.is_update(first):
            self.handle(first)
            return
        batch = [first]
        after: Message | ConnectionEvent | None = None
        while len(batch) < BATCH_LIMIT:
            try:
                item = self.link.inbox.get_nowait()
            except queue.Empty:
                break
            if not self.is_update(item):
                after = item
                break
            batch.append(item)
        self.handle_updates(batch)
        if after is not None:
            self.handle(after)

    def handle_updates(self, messages: Sequence[Message]) -> None:
        """Judge `messages` (updates and update chunks), commit what they bring in one transaction, then
        acknowledge every one of them, rejected and duplicate ones included (they need no commit, and waiting
        costs them nothing). A worker of a shared store that another worker overtook (a device of the batch
        counted elsewhere first, the round closed or a newer one opened) learns what the store holds and judges
        the batch again: a duplicate is then a duplicate, a late update late, as in a single aggregator."""
        for attempt in range(1, MAX_BATCH_TRIES + 1):
            self.retrying = attempt > 1  # judged again after following the store: a later round is early, not new
            try:
                with self.group_commit() as batch:
                    for msg in messages:
                        self.stage_message(msg, batch)
                break
            except (AlreadyCounted, RoundNotCollecting, RoundMoved) as exc:
                if attempt == MAX_BATCH_TRIES:
                    raise
                log.info("a batch of %d update(s) is judged again: %s", len(messages), exc)
                if isinstance(exc, AlreadyCounted):
                    self.learn_counted(messages)
                else:
                    self.follow(force=True)
        for msg in messages:
            self.link.ack(msg)

    def ingest(self, payload: bytes, topic: str, device: str) -> Settled:
        """Judge one whole update and commit it on its own (a batch of one); its final verdict."""
        with self.group_commit() as batch:
            batch.settled.append(self.stage(payload, topic, device, batch))
        return batch.settled[-1]

    @contextmanager
    def group_commit(self) -> Iterator[IngestBatch]:
        """A batch to stage updates into; committed when the block ends. If anything fails before the commit
        is done, the in-memory round goes back to what the store holds (never half a batch counted in memory
        and not on disk) and the error propagates: nothing of the batch was acknowledged."""
        batch = IngestBatch(self.state, len(self.round_norms), len(self.round_counts), replace(self.counters))
        try:
            yield batch
            if batch.accepted:
                assert self.state is not None
                crash_point("aggregator.before_commit", self.state.round)
                self.store.accept_many(self.state, batch.accepted, self.accumulator_snapshot(), self.clock())
                crash_point("aggregator.after_commit", self.state.round)  # counted, but the broker has no PUBACK yet
        except BaseException as exc:
            self.restore(batch, overtaken=isinstance(exc, (AlreadyCounted, RoundNotCollecting, RoundMoved)))
            raise
        self.settle(batch)

    def accumulator_snapshot(self) -> dict[str, np.ndarray]:
        """The running aggregate as stored: the accumulator plus the open round's norms and counts."""
        return {**self.acc.to_arrays(), "__norms__": np.array(self.round_norms),
                "__counts__": np.array(self.round_counts, np.int64)}

    def load_accumulator(self) -> None:
        """The open round's accumulator, norms and counts as the store last committed them (a fresh accumulator
        when it committed none or no round is open): at start, and after a batch that failed before its commit.
        A worker of a shared store loads its own part (pgstore.PostgresStore.accumulator)."""
        saved = None
        if self.state is not None and self.state.phase is Phase.COLLECTING:
            saved = self.store.accumulator(self.state.round)
        self.adopt_accumulator(saved)

    def adopt_accumulator(self, saved: Mapping[str, np.ndarray] | None) -> None:
        """Take `saved` (an accumulator_snapshot; None: nothing counted yet) as the running aggregate."""
        fresh = self.start_aggregation()
        self.acc = fresh if saved is None else type(fresh).from_arrays(saved)
        empty: Mapping[str, np.ndarray] = {}
        self.round_norms = [float(n) for n in (saved or empty).get("__norms__", np.zeros(0))]
        self.round_counts = [int(n) for n in (saved or empty).get("__counts__", np.zeros(0, np.int64))]

    def restore(self, batch: IngestBatch, *, overtaken: bool = False) -> None:
        """Back to the state before `batch`; `overtaken`: another worker moved the store on (it is judged again)."""
        self.state = batch.state
        self.counters = batch.counters
        self.load_accumulator()
        if overtaken:
            return
        log.error("a batch of %d accepted update(s) failed before its commit: none of it is counted, none "
                  "acknowledged (the broker delivers them again after a reconnection or restart)", len(batch.accepted))

    def settle(self, batch: IngestBatch) -> None:
        """THE place where a batch is final: committed (if it accepted anything), each message's verdict in
        `batch.settled` (device, update id, outcome) will never change. Receipts to devices go out from here,
        for every entry of `batch.settled`, before the batch's messages are acknowledged."""
        self.count_accepted(batch.accepted)
        for settled in batch.settled:
            self.send_receipt(settled)

    def send_receipt(self, settled: Settled) -> None:
        """Tell the device its update's final verdict (receipts.py): until then it keeps the update and sends it
        again, because a broker's PUBACK does not mean the aggregator got it (a full queue drops it silently).
        Not waited for: a receipt lost on the way only means one more copy, counted as a duplicate. QoS 0: one
        receipt per update at QoS 1 waits in paho for its PUBACK behind the broker's small inflight window (20),
        and at 100,000 devices they filled paho's 65,535 packet ids ("Message queue full"), after which the
        round's model and status could not be published; a device that misses a receipt sends again, and the
        copy's receipt comes back."""
        if settled.update_id is None or settled.round is None:
            return  # nothing the device could match; it retries until its round ends
        refused = settled.outcome is Outcome.REJECTED
        try:
            receipt = Receipt(settled.update_id, settled.round, "refused" if refused else "counted",
                              settled.reason[:500] if refused else "")
            self.link.publish_nowait(self.topics.receipt(settled.device), encode_receipt(receipt), qos=0)
        except (MqttError, ReceiptError, ValueError) as exc:
            log.debug("no receipt for update %s from %s: %s", settled.update_id, settled.device, exc)

    def count_accepted(self, accepted: Sequence[Envelope]) -> None:
        """Metrics, status page and log lines of committed updates."""
        if not accepted:
            return
        assert self.state is not None
        n, selected = len(self.state.accepted) - len(accepted), len(self.state.selected)
        for env in accepted:
            n += 1
            self.metrics.update_accepted()
            self.view.seen(env.device_id)
            log.info("accepted update %s from %s for round %d (%d/%d)", env.update_id, env.device_id, env.round, n,
                     selected)
        self.view.update_accepted(len(self.state.accepted))

    def stage_message(self, msg: Message, batch: IngestBatch) -> None:
        """Judge one update message (a whole update or a chunk) into `batch`."""
        device = self.topics.device_of(msg.topic, "update") or "?"
        self.counters.bytes_in += len(msg.payload)
        self.metrics.bytes_received(len(msg.payload))
        if msg.payload[:4] != CHUNK_MAGIC:
            batch.settled.append(self.stage(msg.payload, msg.topic, device, batch))
            return
        if self.shared is not None:  # the broker spreads one update's chunks over the workers
            self.reject(f"a chunked update on {msg.topic}: chunked updates need a single aggregator (a SQLite "
                        f"state); with several workers devices must send whole updates (docs/scale-out.md)",
                        "malformed_chunk")
            batch.settled.append(Settled(device, None, None, Outcome.REJECTED, self.last_rejection))
            return
        try:
            whole = self.intake.feed(msg.payload, device)
        except ChunkError as exc:
            self.reject(f"a malformed chunk on {msg.topic}: {exc}", "malformed_chunk")
            batch.settled.append(Settled(device, None, None, Outcome.REJECTED, self.last_rejection))
            return
        if whole is not None:  # the completing chunk is acknowledged after the commit, like a whole update
            batch.settled.append(self.stage(whole, msg.topic, device, batch))

    def learn_counted(self, messages: Sequence[Message]) -> None:
        """Add to the open round what other workers counted of these messages' devices."""
        assert self.shared is not None and self.state is not None
        devices = [d for m in messages if (d := self.topics.device_of(m.topic, "update")) is not None]
        counted = self.state.counted
        for device, update_id in self.shared.counted_among(self.state.round, devices).items():
            if device not in counted:
                counted = counted.plus(device, update_id)
        self.state = replace(self.state, accepted=counted)

    def on_update_message(self, msg: Message) -> None:
        self.handle_updates([msg])

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

    def stage(self, payload: bytes, topic: str, device: str, batch: IngestBatch) -> Settled:
        """Judge one whole update; if accepted, add it to the accumulator and the round state in memory and to
        `batch.accepted` (durable at the batch's commit). Its verdict, final once the batch is committed."""
        refused = Settled(device, None, None, Outcome.REJECTED, "")
        if len(payload) > self.cfg.fleet.max_update_bytes:
            self.reject(f"an oversized update on {topic}: {len(payload)} bytes, the limit is "
                        f"{self.cfg.fleet.max_update_bytes} (fleet.max_update_bytes)", "oversized")
            return replace(refused, reason=self.last_rejection)
        if not self.check_signature(payload, topic, device):
            return replace(refused, reason=self.last_rejection)
        try:
            if is_update_frame(payload):
                env = self.decode_frame(payload, device)
            else:
                env = decode_envelope(payload, max_bytes=self.cfg.fleet.max_update_bytes)
        except EnvelopeError as exc:
            self.reject(f"a malformed update on {topic} (device {device}): {exc}", "malformed")
            return replace(refused, reason=self.last_rejection)
        refused = Settled(device, env.update_id, env.round, Outcome.REJECTED, "")
        if env.kind is not Kind.UPDATE or env.device_id != device:
            self.reject(f"update {env.update_id} on {topic}: kind {env.kind.name} from {env.device_id!r}; "
                        f"an update must be kind UPDATE from the device named in its topic", "wrong_sender")
            return replace(refused, reason=self.last_rejection)
        if self.shared is not None and not self.retrying and (self.state is None or env.round > self.state.round):
            raise RoundMoved(f"update {env.update_id} is for round {env.round}, this worker knows round "
                             f"{None if self.state is None else self.state.round}")
        verdict = rounds.judge(self.state, env, strategy=self.strategy.name,
                               expected=self.strategy.upload_shapes(self.server))
        if verdict.outcome is Outcome.DUPLICATE:
            self.counters.duplicates += 1
            self.metrics.update_duplicate()
            log.info("ignored a redelivery: %s", verdict.reason)
            return replace(refused, outcome=Outcome.DUPLICATE, reason=verdict.reason)
        if verdict.outcome is Outcome.REJECTED:
            self.reject(verdict.reason, judge_reason(verdict.reason))
            return replace(refused, reason=verdict.reason)
        assert self.state is not None
        bounded = self.bound_update(env.tensors, env.num_examples, f"update {env.update_id} from {env.device_id}")
        if bounded is None:
            return replace(refused, reason=self.last_rejection)
        tensors, weight, norm = bounded
        self.strategy.add_update(self.server, self.acc, ClientUpdate(tensors, weight, self.strategy.shared_keys))
        if norm is not None:
            self.round_norms.append(norm)
        self.round_counts.append(max(1, min(int(env.num_examples), self.robust.max_examples)))
        self.state = rounds.accept(self.state, env)
        batch.accepted.append(env)
        return replace(refused, outcome=Outcome.ACCEPTED)

    def decode_frame(self, payload: bytes, device: str) -> Envelope:
        """A compact update frame (a compressed change, codec/update_frame.py) as the envelope of the whole tensors
        it stands for: the global model this round trains from plus the decoded change. The tensors' names and
        shapes come from the round's strategy, not from the bytes. EnvelopeError if it is not a valid frame."""
        shapes = self.strategy.upload_shapes(self.server)
        frame = decode_update_frame(payload, device_id=device, strategy=self.strategy.name, shapes=shapes,
                                    seed_of=frame_seeds(device),
                                    max_bytes=self.cfg.fleet.max_update_bytes)
        tensors = dict(frame.tensors)
        if frame.model_version == self.server.version:  # another version: judged late or early, never added
            base = update_base(self.server.params, shapes)
            tensors = {k: (base[k] + v).astype(np.float32) for k, v in tensors.items()}
        return Envelope(kind=Kind.UPDATE, device_id=frame.device_id, round=frame.round,
                        model_version=frame.model_version, strategy=frame.strategy, update_id=frame.update_id,
                        num_examples=frame.num_examples, tensors=tensors, codec=str(frame.codec))

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
        doc = None
        try:
            doc = json.loads(msg.payload)
            version, n_test = doc["version"], doc["n_test"]
            accs = [doc.get("personal_acc"), doc.get("global_acc")]
            valid = (doc.get("device") == device and type(version) is int and type(n_test) is int and n_test >= 0
                     and all(a is None or (isinstance(a, (int, float)) and 0.0 <= a <= 1.0) for a in accs))
        except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: JSON nested too deep
            valid = False
        if isinstance(doc, dict) and doc.get("device") == device and "refused" in doc:
            self.on_device_refusal(doc, device)
            return
        if not valid:
            log.warning("ignored malformed telemetry on %s (%d bytes)", msg.topic, len(msg.payload))
            return
        personal, glob = (None if a is None else float(a) for a in accs)
        self.store.record_telemetry(version, device, personal, glob, n_test, self.clock())
        self.view.telemetry(version, device, personal, glob, n_test)
        self.view.seen(device)

    def on_device_refusal(self, doc: dict[str, object], device: str) -> None:
        """A device refused a model, a task or its own training (agent/service.py `refuse`): the operator's
        first sign of a poisoned model, or of a device that cannot train."""
        kind = str(doc.get("refused"))[:16]
        self.metrics.device_refused(kind)
        log.warning("device %s refused %s (round %s, model version %s): %s", device, kind, doc.get("round"),
                    doc.get("version"), str(doc.get("reason"))[:300])

    def handle(self, msg: Message | ConnectionEvent) -> None:
        if isinstance(msg, ConnectionEvent):
            if msg.connected:
                if self.lost_at is None:
                    log.info("connected to the broker (%s)", msg.reason)
                else:
                    log.info("back on the broker after %.1f s (%s)", time.monotonic() - self.lost_at, msg.reason)
                    self.lost_at = None
                if self.leads:  # a broker that crashed may have lost our retained messages: publish them again
                    self.publish_model(every_delta=True)
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
        # Workers of a shared store share updates and telemetry (each message goes to one of them); every worker
        # sees presence, so whichever coordinates knows who is online.
        share = self.topics.shared if self.shared is not None else str
        self.link.subscribe(share(self.topics.update_filter), qos=1)
        self.link.subscribe(self.topics.presence_filter, qos=1)
        # QoS 0: telemetry is for the operator, never decides anything, and must not queue for an absent
        # aggregator in front of the updates (Mosquitto's queue limits would then drop updates first).
        self.link.subscribe(share(self.topics.telemetry_filter), qos=0)
        if self.cfg.http and self.http is None:
            self.http = StatusServer(self.cfg.http, self.view, self.metrics)
            self.http.start()
        log.info("aggregator up: strategy %s, %d rounds, waiting for %d device(s)", self.strategy.name,
                 self.round_config.rounds, self.cfg.fleet.expected_clients)

    def tick(self) -> None:
        """What time alone decides: give up on chunked messages that never completed, close a round whose
        deadline passed (or that is complete), open the next one. A worker of a shared store does so only as
        the coordinator, and otherwise follows what the coordinator decided."""
        self.intake.tick()  # partial messages whose other chunks never came
        if self.registry is not None:
            self.registry.refresh()  # enrolment and revocation without a restart (a stat per file, once a second)
        self.presence_log.flush()
        if self.unpublished and self.link.connected:
            self.retry_retained()
        if self.shared is not None:
            now = time.monotonic()
            if now < self.next_poll:
                return
            self.next_poll = now + POLL_S
            if not self.coordinating():
                self.follow()
                return
        self.maybe_close()
        self.maybe_open()

    @property
    def leads(self) -> bool:
        """Does this process open, close and publish rounds? (Always, with a SQLite store.)"""
        return self.shared is None or self.shared.leading

    def coordinating(self) -> bool:
        """Is this worker the coordinator? Takes the role when it is free (the last one stopped or died)."""
        assert self.shared is not None
        if self.shared.leading or not self.shared.try_lead():
            return self.shared.leading
        log.info("worker %s now coordinates fleet %s: it opens, closes and publishes rounds", self.worker,
                 self.cfg.fleet_name)
        self.follow(force=True)
        if self.link.connected:  # the last coordinator may have died between a commit and its publication
            self.publish_model(every_delta=True)
            if self.state is not None and self.state.phase is Phase.COLLECTING:
                self.publish_task()
        return True

    def follow(self, *, force: bool = False) -> None:
        """Catch up with the shared store: the newest round (and who is counted in it), the global model it
        trains from, the bounds, this worker's part of its aggregate. One query when nothing moved."""
        assert self.shared is not None
        head = self.shared.round_head()
        mine = None if self.state is None else (self.state.round, self.state.phase.value)
        if head == mine and not force:
            return
        self.load_round()
        wanted = self.state.model_version if self.state is not None and self.state.phase is Phase.COLLECTING \
            else None
        if wanted is not None and wanted != self.server.version:
            params = self.store.global_at(wanted)
            if params is not None:
                self.server = ServerState(wanted, params)
        elif wanted is None and (latest := self.store.latest_global()) is not None:
            self.server = ServerState(latest[0], latest[1])
        self.metrics.model_version(self.server.version)
        self.view.model_version(self.server.version)
        self.load_bounds()
        self.load_accumulator()
        if head != mine:
            self.counters = RoundCounters()
        if self.state is not None and self.state.phase is Phase.CLOSED and self.state.round >= self.round_config.rounds:
            self.done.set()

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
                self.serve(self.link.inbox.get(timeout=0.2))
            except queue.Empty:
                pass
            self.tick()
        self.shutdown()
