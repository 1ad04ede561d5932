"""A stand-in for a device: backbone, head state, training, in one fresh process; run by
bench/device_footprint.py for comparison with the real `edge-fl agent` process, not on its own.

It imports neither paho nor the agent service nor SQLite, so its peak RSS is a floor for the learning part
alone, not a device agent's footprint (which the benchmark measures on the real process).

Usage: device_worker.py MODEL HEAD_STATE WINDOW_NPY {npz USER_NPZ | dataset SUBJECT} EPOCHS SEED

Deliberately minimal: no argparse, no bench helpers, json imported only after the memory readings, so
that the imports and memory measured are the device's (numpy, edge_agent, the TFLite runtime) and little
else. Times are CLOCK_MONOTONIC stamps, which the parent can subtract from its own spawn stamp.
"""

import time

T_TOP = time.clock_gettime(time.CLOCK_MONOTONIC)  # as early as Python lets us: before any other import

import os  # noqa: E402
import sys  # noqa: E402


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def status_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) from /proc/self/status, in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return round(float(line.split()[1]) / 1024.0, 2)
    return float("nan")


RSS_TOP = status_mb("VmRSS")  # the bare interpreter (plus time, os, sys)


def main(argv: list[str]) -> None:
    model, head_state, window_file, mode, source, epochs, seed = argv
    stamps: dict[str, float] = {"top": T_TOP}
    rss: dict[str, float] = {"top": RSS_TOP}

    # ---- cold start: imports, model load, saved head, first prediction on one fresh window
    import numpy as np

    stamps["numpy_imported"], rss["numpy_imported"] = now(), status_mb("VmRSS")
    from edge_agent.backbone import FrozenBackbone
    from edge_agent.learning.features import EmbeddingStandardizer
    from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead, quantize_head
    from edge_agent.state_io import load_head_state

    stamps["imported"], rss["imported"] = now(), status_mb("VmRSS")
    backbone = FrozenBackbone(model)
    stamps["backbone_loaded"], rss["backbone_loaded"] = now(), status_mb("VmRSS")
    # The device keeps its head and the embedding standardization from the last session in one state file.
    arrays, _meta = load_head_state(head_state)
    standardize = EmbeddingStandardizer(arrays.pop("embedding.mean"), arrays.pop("embedding.std"))
    int8_head = quantize_head(arrays)
    window = np.load(window_file, allow_pickle=False)
    first_pred = int(int8_head.predict(standardize(backbone.embed(window)))[0])
    stamps["first_prediction"], rss["first_prediction"] = now(), status_mb("VmRSS")

    # ---- the user's own windows: a small pre-extracted file (device), or the whole dataset (not a device)
    if mode == "npz":
        with np.load(source, allow_pickle=False) as npz:
            x_train, y_train, x_test, y_test = (npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    else:
        from edge_agent.data.watch import load_watch_dataset
        from edge_agent.data.windows import split_and_window

        train, test = split_and_window(load_watch_dataset())
        tr, te = train.subject == int(source), test.subject == int(source)
        x_train, y_train, x_test, y_test = train.x[tr], train.y[tr], test.x[te], test.y[te]
    stamps["data_loaded"], rss["data_loaded"] = now(), status_mb("VmRSS")

    emb_train = standardize(backbone.embed(x_train))
    emb_test = standardize(backbone.embed(x_test))
    stamps["embedded"], rss["embedded"] = now(), status_mb("VmRSS")

    config = HeadConfig(emb_train.shape[1], len(arrays["classifier.b"]), arrays["adapter.w"].shape[1])
    fit_config = FitConfig().with_epochs(int(epochs))  # project defaults; only the epoch count is ours
    head = PersonalizationHead(config, arrays).fit(emb_train, y_train, fit_config, np.random.default_rng(int(seed)))
    stamps["trained"], rss["trained"] = now(), status_mb("VmRSS")

    pred = head.quantized().predict(emb_test)
    stamps["predicted"], rss["predicted"] = now(), status_mb("VmRSS")
    peak = status_mb("VmHWM")

    heavy = ("tensorflow", "torch", "keras", "jax", "scipy", "sklearn", "pandas", "tflite_runtime", "seglearn")
    top_level = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
    import json  # after the memory readings, so it does not count

    sys.stdout.write(json.dumps({
        "mode": mode, "stamps": stamps, "rss_mb": rss, "peak_rss_mb": peak,
        "n_train": int(y_train.size), "n_test": int(y_test.size), "epochs": int(epochs),
        "first_prediction": first_pred, "test_acc_int8": float(np.mean(pred == y_test)),
        "runtime": backbone.runtime, "heavy_modules_loaded": {m: m in sys.modules for m in heavy},
        "third_party_top_level_modules": top_level, "modules_loaded": len(sys.modules),
        "python": sys.version.split()[0], "numpy": np.__version__, "executable": sys.executable,
        "openblas_env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
