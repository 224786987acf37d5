"""E4 (loadgen/experiment_kunserve.py): the --quick simulator part through the CLI, and the real part's
bookkeeping (drop / restore times from /status samples, the marked markdown section)."""

from __future__ import annotations

import orjson
import pytest

from loadgen.datasets import DEFAULT_DATA_DIR
from loadgen.experiment_kunserve import BEGIN, END, drop_events, latency_metrics, write_real_markdown

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


@needs_data
def test_quick_sim_part_through_the_cli(tmp_path, capsys) -> None:
    from loadgen.cli import main

    out = tmp_path / "kunserve"
    assert (
        main(
            [
                "experiment",
                "kunserve",
                "--part",
                "sim",
                "--quick",
                "--out",
                str(out),
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = orjson.loads((out / "sim.json").read_bytes())
    assert result["label"] == "SIMULATED" and result["meta"]["quick"] is True
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"recompute", "swap", "drop", "drop-always"}
    for r in rows.values():
        assert r["workload"] == "azure-conv" and r["num_requests"] == 150 and 0 < r["num_done"] <= 150
        assert r["command"].startswith("python -m engine.kunserve_experiment --workload azure-conv")
    # The burst exceeds the pool: only the drop mode drops (and restores), and it cuts tail TTFT.
    assert rows["drop"]["num_drops"] >= 1 and rows["drop"]["num_restores"] >= 1
    assert rows["recompute"]["num_drops"] == rows["swap"]["num_drops"] == 0
    assert rows["recompute"]["num_preemptions"] > 0
    assert rows["drop"]["ttft_p99_s"] < rows["recompute"]["ttft_p99_s"]
    assert "| drop |" in result["tables"]["azure-conv"] and "| drop |" in capsys.readouterr().out
    assert not (tmp_path / "kunserve.md").exists()  # the sim part writes JSON only


def test_unknown_experiment_is_a_usage_error(capsys) -> None:
    from loadgen.cli import main

    assert main(["experiment", "nope"]) == 2 and "kunserve" in capsys.readouterr().err


def test_drop_events_and_latency_metrics() -> None:
    samples = [
        {"sampled_at": 10.5, "extra": {"kunserve_drops_total": 1.0, "kunserve_restores_total": 0.0}},
        {"sampled_at": 12.0, "extra": {"kunserve_drops_total": 2.0, "kunserve_freed_weight_bytes": 4e8}},
        {"sampled_at": 19.0, "extra": {"kunserve_drops_total": 2.0, "kunserve_restores_total": 1.0}},
    ]
    ev = drop_events(samples, t0=10.0, before={"kunserve_drops_total": 1.0})
    assert ev["first_drop_at_s"] == pytest.approx(2.0) and ev["first_restore_at_s"] == pytest.approx(9.0)
    assert (
        ev["num_drops"] == 1 and ev["num_restores"] == 1 and ev["max_freed_weight_mb"] == pytest.approx(400)
    )
    assert drop_events([], 0.0, {})["first_drop_at_s"] is None

    req = [
        {"status": "ok", "ttft": 1.0, "e2e": 2.0, "output_tokens": 11},
        {"status": "ok", "ttft": 3.0, "e2e": 3.0, "output_tokens": 1},
        {"status": "error", "ttft": 0.0, "e2e": 0.0, "output_tokens": 0},
    ]
    m = latency_metrics({"requests": req, "duration": 5.0})
    assert m["completed"] == 2 and m["num_requests"] == 3 and m["output_tokens"] == 12
    assert m["ttft_p50_s"] == pytest.approx(2.0) and m["tpot_p50_s"] == pytest.approx(0.1)


def test_real_section_replaces_only_its_markers(tmp_path) -> None:
    row = {
        "param_drop": "on", "completed": 2, "num_requests": 2, "ttft_p50_s": 1.0, "ttft_p99_s": 2.0,
        "tpot_p50_s": 0.05, "tpot_p99_s": 0.1, "num_preemptions": 3, "num_drops": 1, "num_restores": 1,
        "first_drop_at_s": 4.0, "first_restore_at_s": 9.0, "max_freed_weight_mb": 424.8, "duration_s": 20.0,
        "server_command": "kairos serve x", "client_command": "kairos bench y",
    }  # fmt: skip
    result = {
        "meta": {
            "command": "c",
            "date": "d",
            "machine": {"cpu_model": "AMD EPYC", "num_cpus": 2},
            "loadavg_start": [1.0],
        },
        "setup": {"num_requests": 2, "workload": "sharegpt", "max_tokens": 8},
        "wall_seconds": 30.0,
        "rows": [row],
    }
    md = tmp_path / "k.md"
    md.write_text("# E4\n\nabove\n")
    write_real_markdown(result, md)
    write_real_markdown(result, md)  # idempotent: one section
    text = md.read_text()
    assert text.startswith("# E4\n\nabove") and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| on | 2/2 | 1.00 | 2.00 | 50.0 | 100.0 | 3 | 1 / 1 | 4.0 | 9.0 | 424.8 | 20.0 |" in text
