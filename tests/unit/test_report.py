"""Quality against training cost (`python -m maskdit_ds report`) and the device-hours clock behind it."""
import json
import statistics

import pytest

from maskdit_ds.__main__ import main as cli
from maskdit_ds.cli.evaluate import training_record
from maskdit_ds.evaluation.report import read_points, report
from maskdit_ds.training import stats
from maskdit_ds.training.state import TrainState


def write_run(folder, rows):
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0, "device_hours": h, "images_seen": s * 128}) for s, h, _ in rows]
    lines += [json.dumps({"step": s, "digits_class_agreement": q, "device_hours": h, "images_seen": s * 128})
              for s, h, q in rows]
    (folder / "stats.jsonl").write_text("\n".join(lines) + "\n{torn line")
    return folder


def test_runs_sharing_a_label_are_averaged_and_tabulated(tmp_path, capsys):
    a0 = write_run(tmp_path / "a0", [(100, 0.01, 0.5), (200, 0.02, 0.8)])
    a1 = write_run(tmp_path / "a1", [(100, 0.012, 0.6), (200, 0.022, 0.9)])
    b = write_run(tmp_path / "b", [(100, 0.005, 0.3), (200, 0.01, 0.4)])
    assert cli(["report", f"arm={a0}", f"arm={a1}", str(b), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    sd = statistics.stdev([0.8, 0.9])
    assert rows["arm"][:4] == ["2", f"0.85 +- {sd:.2g}", f"0.85 +- {sd:.2g}", f"0.021 +- {statistics.stdev([0.02, 0.022]):.2g}"]
    assert rows["b"][:3] == ["1", "0.4", "0.4"] and rows["b"][4:] == ["25,600", "200"]
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| arm | 2 |" in (tmp_path / "out" / "report.md").read_text()


def test_fid_is_preferred_and_eval_files_add_points(tmp_path):
    run = write_run(tmp_path / "r", [(100, 0.01, 0.5)])
    fid_row = json.dumps({"step": 100, "fid": 40.0, "device_hours": 0.01, "images_seen": 12800})
    stats_file = run / "stats.jsonl"
    stats_file.write_text(stats_file.read_text().replace("{torn line", fid_row + "\n{torn line"))
    (run / "eval").mkdir()
    (run / "eval" / "final.json").write_text(json.dumps({"fid": 12.5, "training": {
        "run": "r", "step": 300, "images_seen": 38400, "device_hours": 0.03}}))
    points = read_points(run, "fid")
    assert [(p.step, p.value, p.device_hours) for p in points] == [(100, 40.0, 0.01), (300, 12.5, 0.03)]
    _, _, text = report([str(run)], tmp_path / "out")
    assert "final fid" in text and "| r | 1 | 12.5 |" in text


def test_a_run_without_quality_values_is_an_error_naming_it(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "stats.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert cli(["report", str(run), "--out", str(tmp_path)]) == 2
    assert f"{run}: no `digits_class_agreement` values" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2


def test_the_clock_charges_training_time_times_devices_and_skips_evaluation(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(stats.time, "perf_counter", lambda: now[0])
    state = TrainState(device_hours=1.0)  # a resumed run continues its count
    clock = stats.DeviceClock(devices=8)
    now[0] += 450  # training
    clock.charge(state)
    assert state.device_hours == pytest.approx(1.0 + 450 * 8 / 3600)
    now[0] += 900  # evaluation
    clock.skip()
    now[0] += 45  # training again
    clock.charge(state)
    assert state.device_hours == pytest.approx(1.0 + 495 * 8 / 3600)


def test_eval_results_record_what_the_model_cost_to_train(tmp_path):
    npz = tmp_path / "samples.npz"
    assert training_record(str(npz)) == {}
    trained = {"run": "r", "step": 300, "images_seen": 38400, "device_hours": 0.03}
    (tmp_path / "samples.json").write_text(json.dumps({"num_images": 8, "training": trained}))
    assert training_record(str(npz)) == {"training": trained}
