"""`edge-fl data import|check` and the simulate options that go with `--data`: usage errors exit 2, bad data
exits 1 with one line naming where, nothing prints a traceback; and the Python example of docs/data-format.md
runs as written."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.cli import main
from edge_agent.data.userdata import load_user_dataset
from edge_agent.data.watch import WatchDataset

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.out, captured.err


def usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("edge-fl")]
    assert len(lines) == 1, err
    return lines[0]


def write_real_csv(path: Path, dataset: WatchDataset, subjects: tuple[int, ...] = (4, 5, 10)) -> None:
    """The first 200 samples of two recordings of each subject, one row per sample."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "exercise", "recording", "time_s", *CHANNELS])
        for subject in subjects:
            recs = [r for r in dataset.recordings if r.subject == subject][:2]
            for rec in recs:
                for i, values in enumerate(rec.samples[:200]):
                    w.writerow([f"s{subject:02d}", dataset.class_names[rec.label], rec.index, repr(i / 50),
                                *(repr(float(v)) for v in values)])


CSV_ARGS = ("--user-column", "user", "--label-column", "exercise", "--channels", ",".join(CHANNELS),
            "--window", "50", "--stride", "25", "--rate", "50", "--session-column", "recording",
            "--time-column", "time_s")


def test_csv_import_then_check(capsys: pytest.CaptureFixture[str], tmp_path: Path, dataset: WatchDataset) -> None:
    write_real_csv(tmp_path / "imu.csv", dataset)
    out = tmp_path / "imu"
    rc, stdout, err = cli(capsys, "data", "import", "csv", str(tmp_path / "imu.csv"), "--out", str(out), *CSV_ARGS,
                          "--pretrain", "s04", "--federate", "s05", "--holdout", "s10", "--license", "BSD-3-Clause")
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out}\nimu (format edge-fl-userdata v1, windows 50x6")
    ds = load_user_dataset(out)
    assert ds.card.roles.pretrain == ("s04",) and ds.card.roles.federate == ("s05",) and ds.card.license == \
        "BSD-3-Clause"
    assert ds.card.channel_names == CHANNELS and (ds.card.window_length, ds.card.window_stride) == (50, 25)
    assert all(len(u) == 2 * 7 for u in ds.users.values())  # 200 samples: windows at 0, 25, ..., 150
    rc, stdout, _ = cli(capsys, "data", "check", str(out))
    assert rc == 0 and stdout == ds.describe() + "\n"
    # a second import into the same directory is refused unless asked, then replaces it
    rc, _, err = cli(capsys, "data", "import", "csv", str(tmp_path / "imu.csv"), "--out", str(out), *CSV_ARGS)
    assert rc == 1 and "exists and is not empty" in one_error_line(err)
    rc, _, err = cli(capsys, "data", "import", "csv", str(tmp_path / "imu.csv"), "--out", str(out), *CSV_ARGS,
                     "--overwrite")
    assert rc == 0, err
    assert load_user_dataset(out).card.roles.federate == ("s04", "s05", "s10")  # no roles given: all federate


def test_bad_csv_data_exits_1_naming_file_line_and_column(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         dataset: WatchDataset) -> None:
    good = tmp_path / "imu.csv"
    write_real_csv(good, dataset)
    lines = good.read_text().splitlines()
    row = lines[7].split(",")
    row[5] = "n/a"  # the 'ay' value of line 8
    lines[7] = ",".join(row)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    rc, _, err = cli(capsys, "data", "import", "csv", str(bad), "--out", str(tmp_path / "o"), *CSV_ARGS)
    line = one_error_line(err)
    assert rc == 1 and f"{bad}, line 8, column 'ay': 'n/a' is not a number" in line
    rc, _, err = cli(capsys, "data", "import", "csv", str(good), "--out", str(tmp_path / "o"), *CSV_ARGS,
                     "--federate", "s04,s05")
    assert rc == 1 and "user(s) ['s10'] are in the file but in no role" in one_error_line(err)
    rc, _, err = cli(capsys, "data", "import", "csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"),
                     *CSV_ARGS)
    assert rc == 1 and "missing.csv: cannot be read" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_check_refuses_what_is_not_a_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = cli(capsys, "data", "check", str(tmp_path))
    assert rc == 1 and out == ""
    assert one_error_line(err) == (f"edge-fl: error: {tmp_path}: no dataset.json; this is not an edge-fl user "
                                   "dataset (create one with `edge-fl data import ...` or see docs/data-format.md)")
    (tmp_path / "dataset.json").write_text("{\"format\": \"edge-fl-userdata\", \"version\": 1,")
    rc, _, err = cli(capsys, "data", "check", str(tmp_path))
    assert rc == 1 and "dataset.json, field '(file)': not valid JSON" in one_error_line(err)


@pytest.mark.parametrize("args, expected", [
    (["data", "import", "csv", "f.csv", "--out", "o", *CSV_ARGS[:-4], "--window", "0"],
     "argument --window: expected a whole number of at least 1, got '0'"),
    (["data", "import", "csv", "f.csv", "--out", "o", *CSV_ARGS[:5], "a,,b", *CSV_ARGS[6:]],
     "argument --channels: expected comma-separated non-empty names, got 'a,,b'"),
    (["data", "import", "csv", "f.csv", "--out", "o", *CSV_ARGS[:-6], "--rate", "-50"],
     "argument --rate: expected a positive number, got '-50'"),
    (["data", "import", "csv", "f.csv", *CSV_ARGS], "the following arguments are required: --out"),
    (["data", "import", "hapt"], "the following arguments are required: --out"),
    (["data", "import", "hapt", "--out", "o", "--stride", "x"], "argument --stride: expected a whole number"),
    (["data", "import", "zip", "--out", "o"], "invalid choice: 'zip' (choose from 'watch', 'hapt', 'csv')"),
    (["data", "check"], "the following arguments are required: DIR"),
    (["simulate", "--data", "d", "--split", "random"], "argument --split: invalid choice: 'random'"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    assert expected in usage_error(capsys, *args)


@pytest.mark.parametrize("extra, named", [
    (["--dataset", "watch_dataset.npy"], "--dataset"),
    (["--window", "3"], "--window"),
    (["--stride", "1", "--plot", "c.png"], "--stride, --plot"),
])
def test_simulate_refuses_bundled_recording_options_with_data(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              extra: list[str], named: str) -> None:
    rc, out, err = cli(capsys, "simulate", "--data", str(tmp_path), *extra)
    assert rc == 2 and out == ""
    assert one_error_line(err).startswith(f"edge-fl simulate: {named} cannot be combined with --data")


def test_data_path_and_fetch_still_parse(capsys: pytest.CaptureFixture[str], dataset: WatchDataset) -> None:
    rc, out, _ = cli(capsys, "data", "path")
    assert rc == 0 and out.strip().endswith("watch_dataset.npy") and Path(out.strip()).is_file()
    from edge_agent.cli import build_parser

    args = build_parser().parse_args(["data", "fetch", "--force", "--data-dir", "d"])
    assert (args.data_command, args.force, args.data_dir) == ("fetch", True, Path("d"))


def _doc_example() -> str:
    """The Python block under 'Simulating your own features from Python' in docs/data-format.md."""
    text = (ROOT / "docs" / "data-format.md").read_text()
    section = text.split("## Simulating your own features from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return str(blocks[0])


def test_the_documented_features_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = _doc_example()
    assert 10 <= len(code.strip().splitlines()) <= 25
    monkeypatch.chdir(tmp_path)  # the example writes ./my-features
    namespace: dict[str, Any] = {"__name__": "doc_example"}
    exec(compile(code, "docs/data-format.md", "exec"), namespace)
    summary = namespace["result"]["summary"]
    assert summary["mean_acc"] > 0.8 and summary["new_user_acc"] > 0.8  # chance is 1/3
    assert capsys.readouterr().out.startswith("{'mean_acc': ")
    # the same directory through the command line
    rc, _, err = cli(capsys, "simulate", "--data", "my-features", "--rounds", "5", "--strategy", "ditto", "-q",
                     "--out", "r.json")
    assert rc == 0, err
    doc = json.loads(Path("r.json").read_text())
    assert doc["summary"] == summary and doc["backbone"] is None
    assert doc["data"]["kind"] == "features" and doc["data"]["split"]["rule"] == "segment"
    assert np.isclose(doc["data"]["split"]["test_fraction"], 0.3)
