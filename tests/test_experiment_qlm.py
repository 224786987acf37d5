"""E2 (loadgen/experiment_qlm.py): the --quick simulator part end to end, and the scoring rules it reports with."""

from __future__ import annotations

import orjson
import pytest

from loadgen.datasets import DEFAULT_DATA_DIR
from loadgen.experiment_qlm import ClassTarget, class_metrics, rwt_accuracy
from loadgen.experiment_qlm_report import BEGIN, END

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


@needs_data
def test_quick_sim_part_writes_rows_plots_and_markdown(tmp_path) -> None:
    from loadgen.cli import main

    out, md = tmp_path / "qlm", tmp_path / "qlm.md"
    md.write_text(f"# E2\n\nkept above\n\n{BEGIN}\nold\n{END}\n\nkept below\n")
    assert (
        main(["experiment", "qlm", "--part", "sim", "--quick", "--out", str(out), "--workdir", str(tmp_path)])
        == 0
    )

    result = orjson.loads((out / "sim.json").read_bytes())
    rows = {r["policy"]: r for r in result["rows"]}
    assert set(rows) == {"vllm", "edf", "qlm"} and result["meta"]["quick"] is True
    for r in rows.values():
        assert r["completed"] == r["num_requests"] == 200
        assert r["interactive_num"] + r["batch_num"] == 200 and r["batch_num"] > 0
        assert 0.0 <= r["interactive_attainment"] <= 1.0 and 0.0 <= r["batch_attainment"] <= 1.0
        assert r["num_swaps"] + r["num_recomputes"] == r["num_preemptions"]
        assert r["command"].startswith("kairos simulate --workload mixed-sharegpt --rate 16")
    # Only qlm swaps (the host pool is priced by the cost model), evicts, and logs its estimator's accuracy.
    assert rows["qlm"]["num_swaps"] > 0 and rows["qlm"]["num_evictions"] > 0 and rows["qlm"]["rwt_pairs"] > 0
    assert 0.0 <= rows["qlm"]["rwt_coverage"] <= 1.0 and rows["qlm"]["rwt_sample"]
    for policy in ("vllm", "edf"):
        assert rows[policy]["num_swaps"] == rows[policy]["num_evictions"] == rows[policy]["rwt_pairs"] == 0
    assert not list((tmp_path / "sim").rglob("*.json"))  # raw per-point reports are not kept
    assert (out / "sim.png").stat().st_size > 0 and (out / "rwt.png").stat().st_size > 0

    text = md.read_text()
    assert text.startswith("# E2\n\nkept above") and text.endswith("kept below\n") and "old" not in text
    assert "SIMULATED" in text and "| 16 | qlm |" in text and "qlm/sim.png" in text and "qlm/rwt.png" in text


def _request(slo_class: str, ttft: float, e2e: float, tokens: int, status: str = "ok") -> dict:
    return {"slo_class": slo_class, "ttft": ttft, "e2e": e2e, "output_tokens": tokens, "status": status}


def test_class_attainment_scores_each_class_on_its_own_targets() -> None:
    targets = {"interactive": ClassTarget(ttft_s=2.0, tpot_s=0.2), "batch": ClassTarget(e2e_s=60.0)}
    requests = [
        _request("interactive", 1.0, 2.0, 11),  # tpot 0.1: met
        _request("interactive", 1.0, 4.0, 11),  # tpot 0.3: missed
        _request("interactive", 3.0, 3.5, 2),  # ttft 3: missed
        _request("batch", 50.0, 59.0, 5),  # a late first token is fine for batch
        _request("batch", 1.0, 61.0, 5),  # e2e 61: missed
        _request("batch", 0.0, 0.0, 0, status="error"),  # failed: a miss
    ]
    m = class_metrics(requests, targets, duration_s=10.0)
    assert m["interactive_attainment"] == pytest.approx(1 / 3) and m["batch_attainment"] == pytest.approx(
        1 / 3
    )
    assert m["attainment"] == pytest.approx(2 / 6) and m["completed"] == 5
    assert m["request_throughput"] == pytest.approx(0.5)


def test_rwt_accuracy_errors_coverage_and_rank_correlation() -> None:
    pairs = [(2.0, 1.0), (3.0, 3.5), (5.0, 4.0), (9.0, 6.0)]  # (estimated, actual)
    acc = rwt_accuracy(pairs)
    assert acc["rwt_pairs"] == 4 and acc["rwt_mean_error_s"] == pytest.approx((1 - 0.5 + 1 + 3) / 4)
    assert acc["rwt_median_abs_error_s"] == pytest.approx(1.0)
    assert acc["rwt_coverage"] == pytest.approx(0.75) and acc["rwt_spearman"] == pytest.approx(1.0)
    assert rwt_accuracy([]) == {"rwt_pairs": 0}
