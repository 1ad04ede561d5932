"""`edge-fl` command line. Subcommands are thin: parse, call the library, print, exit with a code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

log = logging.getLogger("edge_fl")

class Progress:
    """One self-overwriting line on a terminal; a plain line every few seconds when piped to a log."""

    def __init__(self, stream: Any = sys.stderr, quiet: bool = False) -> None:
        self.stream, self.quiet = stream, quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last = 0.0

    def update(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self.last > 5.0:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now


def _fmt(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'strategy':<10} {'mean':>6} {'p10':>6} {'worst':>6} {'new user':>9} {'uplink B/client/round':>22}"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        s = res["summary"]
        lines.append(f"{name:<10} {_fmt(s['mean_acc']):>6} {_fmt(s['p10_acc']):>6} {_fmt(s['worst_acc']):>6} "
                     f"{_fmt(s['new_user_acc']):>9} {s['uplink_bytes_per_client_round']:>22.0f}")
    lines.append("accuracy in % on each client's later-in-time test windows, int8 heads; new user = never-seen subject")
    return "\n".join(lines)


def _load_embedded(args: argparse.Namespace, progress: Progress) -> Any:
    from .backbone import EmbeddingCache, FrozenBackbone
    from .data.federated import default_cache_dir, embed_dataset
    from .data.watch import load_watch_dataset
    from .data.windows import WindowConfig

    feature: str | int | None = args.feature_output
    if isinstance(feature, str) and feature.isdigit():
        feature = int(feature)
    backbone = FrozenBackbone(args.model, feature_output=feature, runtime=args.runtime, num_threads=args.threads,
                              reference_kernels=args.reference_kernels)
    progress.update(f"embedding windows with {backbone.path.name} ({backbone.runtime}, {args.threads} thread(s))...")
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir or default_cache_dir())
    window = WindowConfig(length_s=args.window, stride_s=args.stride)
    t0 = time.perf_counter()
    embedded = embed_dataset(load_watch_dataset(args.dataset), backbone, window, cache)
    progress.update(f"embedded {len(embedded.train) + len(embedded.test)} windows in {time.perf_counter() - t0:.1f}s "
                    f"(backbone sha256 {backbone.sha256[:12]})", final=True)
    return embedded, backbone


def cmd_simulate(args: argparse.Namespace) -> int:
    from .data.federated import federate
    from .learning.strategies import STRATEGIES
    from .learning.training import DEFAULT_STRATEGY, TrainingConfig
    from .sim import run_simulation

    progress = Progress(quiet=args.quiet)
    embedded, backbone = _load_embedded(args, progress)
    names = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    base, partition = _fleet_configs(args, names[0])
    data = federate(embedded, partition)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        cfg = TrainingConfig(**{**base.__dict__, "strategy": name})

        def tick(r: int, n: int, rec: dict[str, Any], _name: str = name) -> None:
            progress.update(f"[{_name}] round {r}/{n}  mean {100 * rec['mean_acc']:.1f}%  "
                            f"worst {100 * rec['worst_acc']:.1f}%", final=(r == n and not progress.tty))

        results[name] = run_simulation(data, cfg, progress=tick)
        results[name]["backbone"] = {"path": str(backbone.path), "sha256": backbone.sha256, "runtime": backbone.runtime}
    progress.update("", final=progress.tty)
    print(f"regime={args.regime} rounds={args.rounds} seed={args.seed} clients={len(data.clients)}"
          + (f" shots={args.shots}" if args.regime == "few-shot" else ""))
    print(format_table(results))
    if args.out:
        doc: dict[str, Any] = results[names[0]] if len(names) == 1 else {"strategies": results}
        Path(args.out).write_text(json.dumps(doc, indent=1, allow_nan=False, default=float))
        print(f"results written to {args.out}")
    if args.plot:
        from .report import few_shot_curve, plot_few_shot_curve

        curve = few_shot_curve(embedded, base, [args.seed], [DEFAULT_STRATEGY, "fedavg", "local"],
                               lambda text: progress.update(text))
        progress.update("few-shot curve done", final=progress.tty)
        plot_few_shot_curve(curve, Path(args.plot))
        print(f"few-shot curve written to {args.plot}")
    return 0


def _stop_on_signals() -> Any:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent.service import AgentService
    from .config import AgentConfig, load_config

    cfg = load_config(args.config, AgentConfig, args.set)
    if not cfg.signing.key:
        log.warning("signatures are OFF ([signing] unset): whoever can publish on the broker can forge round tasks "
                    "and models for this device; see deploy/README.md, 'Keys'")
    AgentService(cfg).run(_stop_on_signals())
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    import threading

    from .aggregator.service import AggregatorService
    from .config import AggregatorConfig, load_config

    cfg = load_config(args.config, AggregatorConfig, args.set)
    if args.http is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, http=args.http or None)
    if not cfg.signing.key:
        log.warning("signatures are OFF ([signing] unset): whoever can publish on the broker can forge any device's "
                    "updates; see deploy/README.md, 'Keys'")
    service = AggregatorService(cfg)
    stop = _stop_on_signals()
    import signal

    registry = service.registry

    def reload(*_: object) -> None:
        # `systemctl reload` sends SIGHUP: it must never stop the aggregator, whatever it is configured with.
        if registry is not None:
            registry.request_reload()  # rescan the device key registry
        else:
            log.info("SIGHUP: nothing to reload (no [signing] registry configured)")

    signal.signal(signal.SIGHUP, reload)
    if args.exit_when_done:
        threading.Thread(target=lambda: (service.done.wait(), stop.set()), daemon=True).start()
    service.run(stop)
    return 0


def _http_address(text: str) -> str:
    """--http's value, checked by argparse (a bad one is a usage error, exit 2); '' turns HTTP off."""
    from .aggregator.web import parse_address

    if text:
        try:
            parse_address(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_status(args: argparse.Namespace) -> int:
    from .status import StatusError, StatusQuery, run_status

    host, port, fleet, user, password, state = "127.0.0.1", 1883, args.fleet, args.username, None, args.state
    if args.config is not None:
        from .config import AggregatorConfig, load_toml

        cfg = load_toml(args.config, AggregatorConfig)
        b = cfg.broker
        host, port, user, password = b.host, b.port, user or b.username, b.secret()
        fleet, state = fleet or cfg.fleet_name, state or cfg.state
    if args.broker is not None:
        from .aggregator.web import parse_address

        host, port = parse_address(args.broker)
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    if args.watch is not None and args.watch <= 0:
        print("edge-fl status: --watch takes a positive number of seconds", file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    query = StatusQuery(fleet or "default", host, port, username=user, password=password,
                        state_db=None if state is None else str(state), rounds=args.rounds, timeout_s=args.timeout)
    try:
        return run_status(query, sys.stdout, as_json=args.json, watch_s=args.watch, stop=stop.is_set)
    except StatusError as exc:
        print(f"edge-fl status: {exc}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, Interrupted, run_demo

    train, partition = _fleet_configs(args, args.strategy)
    if not args.broker and (args.username or args.password or args.password_file):
        print("edge-fl demo: --username, --password and --password-file go with --broker (the private broker "
              "makes its own users)", file=sys.stderr)
        return 2
    password = args.password
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    cfg = DemoConfig(train=train, partition=partition, broker=args.broker, username=args.username,
                     password=password, timeout_s=args.timeout, workdir=args.workdir, agents=args.agents,
                     keep_logs=args.keep_logs, plain=args.plain)
    t0 = time.perf_counter()
    try:
        result = run_demo(cfg, args.out, printer=lambda text: print(text, flush=True))
    except Interrupted as stop:  # every process the demo started has been stopped
        print(f"edge-fl: demo stopped by {stop.name}", file=sys.stderr)
        return stop.exit_code
    s = result["summary"]
    print(f"done in {time.perf_counter() - t0:.0f} s: personalized mean {100 * s['mean_acc']:.1f}%, "
          f"10th percentile {100 * s['p10_acc']:.1f}%, worst {100 * s['worst_acc']:.1f}%"
          + (f"; results written to {args.out}" if args.out else ""))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.fetch import fetch_watch_dataset
    from .data.watch import locate_watch_dataset

    if args.data_command == "fetch":
        path = fetch_watch_dataset(args.data_dir, wheel=args.wheel, force=args.force)
        print(f"watch recordings ready: {path}")
    else:
        print(locate_watch_dataset())
    return 0


def _add_fleet_options(p: argparse.ArgumentParser) -> None:
    """The training and data options `simulate` and `demo` share: the same flags mean the same fleet."""
    from .data.partition import REGIMES
    from .learning.training import TrainingConfig

    defaults = TrainingConfig()
    p.add_argument("--regime", default="natural", choices=list(REGIMES), help="what each client holds")
    p.add_argument("--rounds", type=int, default=defaults.rounds, help="federated rounds")
    p.add_argument("--seed", type=int, default=0, help="seeds the partition, initial weights and sampling")
    p.add_argument("--shots", type=int, default=5, help="few-shot: labelled windows per class per client (0 = all)")
    p.add_argument("--classes-per-client", type=int, default=3, help="label-skew: classes each client keeps")
    p.add_argument("--alpha", type=float, default=0.5, help="dirichlet: concentration of class proportions")
    p.add_argument("--fraction", type=float, default=defaults.fraction, help="share of clients sampled per round")
    p.add_argument("--adapter-dim", type=int, default=defaults.adapter_dim,
                   help="width of the shared adapter (0 = none)")
    p.add_argument("--local-epochs", type=int, default=defaults.local_epochs,
                   help="epochs each client trains per round")
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate of the head")
    p.add_argument("--ditto-lambda", type=float, default=defaults.ditto_lambda,
                   help="ditto: pull of the personal head towards the global head")
    p.add_argument("--float-updates", action="store_true", help="send float32 instead of int8 tensors")
    p.add_argument("--codec", type=_codec_text, default="", metavar="CODEC",
                   help="compress updates: the change from the global model, with error feedback, in the compact "
                        "update frame: float32, float16, int8[+sr], int4[+sr], sign1[+rot][+sr], topk:F, "
                        "subsample:F[+sr] (F a fraction, e.g. topk:0.05); default: whole tensors, int8 per channel "
                        "(README, 'Compressed updates')")
    p.add_argument("--downlink-codec", type=_codec_text, default="", metavar="CODEC",
                   help="compress the global model on its way down: each version as its change from the one "
                        "before, in CODEC (same names as --codec), with error feedback on the aggregator; devices "
                        "fetch the whole model only to start or to resync; default: the whole model in every task")


def _fleet_configs(args: argparse.Namespace, strategy: str) -> tuple[Any, Any]:
    """(TrainingConfig, PartitionConfig) from the options of `_add_fleet_options`."""
    from .data.partition import PartitionConfig
    from .learning.training import TrainingConfig

    train = TrainingConfig(strategy=strategy, rounds=args.rounds, seed=args.seed, fraction=args.fraction,
                           adapter_dim=args.adapter_dim, local_epochs=args.local_epochs, lr=args.lr,
                           ditto_lambda=args.ditto_lambda, int8_updates=not args.float_updates, codec=args.codec,
                           downlink_codec=args.downlink_codec)
    partition = PartitionConfig(regime=args.regime, seed=args.seed, shots=args.shots,
                                classes_per_client=args.classes_per_client, alpha=args.alpha)
    return train, partition


def _codec_text(text: str) -> str:
    """`--codec`: a codec the compression layer knows (argparse turns the error into a usage message, exit 2)."""
    from .codec.compression import CodecSpec
    from .codec.tensor_pack import CodecError

    if text == "":  # the default: whole tensors in the envelope
        return ""
    try:
        return str(CodecSpec.parse(text))
    except CodecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo_agents(text: str) -> int:
    """`--agents`: a whole number of at least 1 (argparse turns the error into a usage message, exit 2)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of agents, at least 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from .backbone import DEFAULT_MODEL
    from .config_tools import add_parsers as add_config_parsers
    from .config_tools import add_set_option
    from .data.partition import CLIENT_SUBJECTS, REGIMES
    from .learning.strategies import STRATEGIES
    from .learning.training import DEFAULT_STRATEGY

    parser = argparse.ArgumentParser(prog="edge-fl", description="Federated personalization layers for edge devices.")
    parser.add_argument("--version", action="version", version=f"edge-fl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate", help="run a federation in one process on the real sensor data",
        description="Run the federation in one process over the same strategy and codec code as the real system. "
                    "Strategies: " + "; ".join(f"{n}: {c.summary}" for n, c in STRATEGIES.items()) + ". "
                    "Regimes: " + "; ".join(f"{n}: {d}" for n, d in REGIMES.items()) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sim.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=[*STRATEGIES, "all"],
                     help="'all' runs every strategy on identical splits and prints a comparison")
    _add_fleet_options(sim)
    sim.add_argument("--out", type=Path, help="write the results JSON here")
    sim.add_argument("--plot", type=Path, metavar="PNG",
                     help=f"also draw accuracy vs labelled windows per class for {DEFAULT_STRATEGY}, fedavg and local")
    sim.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="backbone .tflite")
    sim.add_argument("--feature-output",
                     help="backbone output to use as embedding: signature key, tensor name or index")
    sim.add_argument("--runtime", default="auto", choices=["auto", "ai-edge-litert", "tflite-runtime"])
    sim.add_argument("--threads", type=int, default=1, help="interpreter threads")
    sim.add_argument("--reference-kernels", action="store_true", default=None,
                     help="no XNNPACK delegate: bit-identical embeddings across LiteRT and tflite-runtime")
    sim.add_argument("--window", type=float, default=2.0, help="window length in seconds")
    sim.add_argument("--stride", type=float, default=0.5, help="window stride in seconds")
    sim.add_argument("--dataset", type=Path, help="path to watch_dataset.npy (default: `edge-fl data path`)")
    sim.add_argument("--cache-dir", type=Path, help="embedding cache (default: ~/.cache/edge-fl/embeddings)")
    sim.add_argument("--no-cache", action="store_true", help="always run the backbone")
    sim.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    sim.set_defaults(func=cmd_simulate)

    agent = sub.add_parser("agent", help="run a device agent (see deploy/ for systemd and Termux)",
                           description="Run a device agent: trains the personalization head on local data when a "
                                       "round selects it, uploads the shared tensors, keeps the personal ones.")
    agent.add_argument("--config", type=Path, required=True, help="agent TOML (see deploy/agent.example.toml)")
    add_set_option(agent)
    agent.set_defaults(func=cmd_agent)

    agg = sub.add_parser("aggregator", help="run the aggregator",
                         description="Run the aggregator: opens rounds, validates and aggregates updates, "
                                     "publishes global versions. State survives restarts (SQLite).")
    agg.add_argument("--config", type=Path, required=True, help="aggregator TOML (see deploy/aggregator.example.toml)")
    agg.add_argument("--exit-when-done", action="store_true", help="exit 0 after the last round")
    agg.add_argument("--http", metavar="HOST:PORT", type=_http_address,
                     help="serve the status page, /api/status and Prometheus /metrics here (':9465' = loopback; "
                          "overrides the config's http key; '' turns it off)")
    add_set_option(agg)
    agg.set_defaults(func=cmd_aggregator)

    demo = sub.add_parser("demo", help="a whole fleet on this machine through a real Mosquitto",
                          description="Start a private Mosquitto (or use --broker), the aggregator and --agents agent "
                                      "processes on the real recordings (by default one per federated subject); print "
                                      "a table per round. SIGINT, SIGTERM and SIGHUP stop every process it started "
                                      "(exit code 128 + signal number). Logs are kept, and their path printed, when "
                                      "the run fails.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=list(STRATEGIES))
    _add_fleet_options(demo)
    demo.add_argument("--agents", type=_demo_agents, default=len(CLIENT_SUBJECTS),
                      help=f"agent processes; beyond {len(CLIENT_SUBJECTS)} they share the subjects' recordings, "
                           "each with its own device id")
    demo.add_argument("--plain", action="store_true",
                      help="the development setup: password logins over plain MQTT, no signatures (default: the "
                           "private broker runs mutual TLS and every update, task and model is signed)")
    demo.add_argument("--broker", metavar="HOST:PORT", help="use this broker instead of a private one (with "
                                                            "password logins: implies --plain)")
    demo.add_argument("--username", help="with --broker: the MQTT user of every process")
    demo.add_argument("--password", help="with --broker: its password (visible to ps; prefer --password-file)")
    demo.add_argument("--password-file", type=Path, metavar="FILE", help="with --broker: read the password here")
    demo.add_argument("--timeout", type=float, default=170.0, help="give up after this many seconds")
    demo.add_argument("--workdir", type=Path, help="keep configs, logs and state here (default: a temp dir, removed "
                                                   "after a successful run)")
    demo.add_argument("--keep-logs", action="store_true", help="keep the temp dir after a successful run too")
    demo.add_argument("--out", type=Path, help="write the results JSON here")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="get the sensor recordings simulate, demo and agents train on",
                          description="The watch recordings ship inside the seglearn 1.2.5 wheel. `fetch` downloads "
                                      "that wheel with pip (no dependencies, nothing installed), checks its sha256 "
                                      "and keeps only the recordings, in the user's data directory.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,path}")
    fetch = data_sub.add_parser("fetch", help="download, check and unpack the recordings",
                                description="Download seglearn==1.2.5 with `pip download --no-deps`, check its "
                                            "sha256, extract watch_dataset.npy.")
    fetch.add_argument("--data-dir", type=Path,
                       help="where to put it (default: $EDGEFL_DATA_DIR, else $XDG_DATA_HOME/edge-fl, "
                            "else ~/.local/share/edge-fl)")
    fetch.add_argument("--wheel", type=Path, metavar="FILE",
                       help="use this seglearn-1.2.5-py3-none-any.whl instead of downloading it")
    fetch.add_argument("--force", action="store_true", help="fetch again even if the file is there")
    data_sub.add_parser("path", help="print where the recordings are found (exit 1 if nowhere)")
    data.set_defaults(func=cmd_data)

    # Listed for `edge-fl --help`; main() hands `edge-fl bridge ...` to firmware_bridge.bridge_cli whole.
    status = sub.add_parser(
        "status", help="what a running fleet is doing: rounds, devices online, accuracy",
        description="Show a fleet's global model, current round, devices online and the last closed round, read from "
                    "what its aggregator publishes on the broker (retained messages); with the aggregator's state "
                    "database (--state, or the `state` key of --config) also the rounds' history with accuracy. "
                    "Exit 0, or 1 when no broker or aggregator answers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    status.add_argument("--config", type=Path, help="the aggregator's TOML: broker, credentials, fleet and state")
    status.add_argument("--broker", metavar="HOST:PORT", help="broker address (default: from --config, else "
                                                               "127.0.0.1:1883)")
    status.add_argument("--fleet", help="fleet name (default: from --config, else 'default')")
    status.add_argument("--username", help="MQTT user with read access to the fleet's topics")
    status.add_argument("--password-file", type=Path, help="file holding that user's password")
    status.add_argument("--state", metavar="DB", help="the aggregator's state database (read-only): a SQLite file "
                                                      "or the workers' postgresql:// URL")
    status.add_argument("--rounds", type=int, default=10, help="rounds of history to show")
    status.add_argument("--json", action="store_true", help="one JSON document (per --watch interval)")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until interrupted")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    status.set_defaults(func=cmd_status)

    sub.add_parser("bridge", help="live view of a microcontroller on a serial link (edge-fl bridge --help)")
    add_config_parsers(sub)  # init agent|aggregator, check-config
    from .keys_cli import add_parsers as add_keys_parsers

    add_keys_parsers(sub)  # keys new|public|register|revoke|list
    from .enrol import add_parser as add_enrol_parser

    add_enrol_parser(sub)  # enrol DEVICE_ID: TLS key and CSR
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bridge"]:
        from firmware_bridge.bridge_cli import main as bridge_main

        return int(bridge_main(args_list[1:]))
    parser = build_parser()
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # paho's own log repeats, less clearly, what the link reports (reconnect attempts while a broker is away).
    logging.getLogger("edge_agent.transport.paho").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    from .backbone import BackboneError
    from .config import EXIT_CONFIG, ConfigError
    from .data.watch import DatasetError

    try:
        return int(args.func(args))
    except ConfigError as exc:  # its own exit code: systemd's RestartPreventExitStatus stops retrying a typo
        print(f"edge-fl: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (BackboneError, DatasetError, ValueError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"edge-fl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edge-fl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
