"""Each benchmark script runs on a tiny setting and writes its section."""

from __future__ import annotations

from benchmarks import latency


def test_latency_benchmark_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    latency.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "<!-- begin latency -->" in text and "## Latency measurement" in text
    assert "| digits-cnn | 0.5 |" in text
    assert "Machine:" in text and "Command:" in text
    # A second run replaces its section instead of appending another.
    latency.main(["--tiny", "--out", str(out)])
    assert out.read_text().count("<!-- begin latency -->") == 1


def test_early_stop_benchmark_writes_its_section(tmp_path, ray_cluster):
    from benchmarks import early_stop

    out = tmp_path / "RESULTS.md"
    early_stop.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## Early rejection and early stopping" in text
    assert "| all rules off |" in text and "| defaults (all on) |" in text
    assert "Finetune time saved:" in text


def test_orchestration_benchmark_runs_both_sides_on_one_workload(tmp_path, ray_cluster):
    from benchmarks import orchestration

    out = tmp_path / "RESULTS.md"
    orchestration.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "| prunesearch |" in text and "| Ray Tune + OptunaSearch |" in text
    assert "Wall-time ratio Ray Tune / prunesearch:" in text
