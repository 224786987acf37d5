"""engine/balance_experiment.py: a small run of every variant (2 simulated replicas), its rows and placements."""

from __future__ import annotations

import orjson
import pytest

from engine.balance_experiment import VARIANTS, main
from loadgen.datasets import DEFAULT_DATA_DIR

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


@needs_data
def test_small_run_of_every_variant(tmp_path, capsys) -> None:
    out = tmp_path / "balance.json"
    argv = ["--workload", "mixed-sharegpt", "--rate", "32", "--num-requests", "60", "--max-tokens", "256"]
    assert main([*argv, "--kv-blocks", "512", "--swap-space", "4GiB", "--json", str(out)]) == 0
    rows = orjson.loads(out.read_bytes())["rows"]
    assert [(r["policy"], r["dispatch"]) for r in rows] == list(VARIANTS)
    for row in rows:
        assert sum(row["placements"].values()) == 60 and row["num_done"] == 60
        assert 0.0 <= row["interactive_slo"] <= 1.0 and 0.0 <= row["batch_slo"] <= 1.0
    assert set(rows[0]["placements"]) == {"least_loaded"} and set(rows[3]["placements"]) == set(
        rows[5]["placements"]
    ) == {"least_wait"}
    assert "| qlm | rwt |" in capsys.readouterr().out
