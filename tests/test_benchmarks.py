"""Smoke runs of the benchmark scripts (not timed tests: the numbers are in BENCHMARKS.md), so they cannot rot."""

from __future__ import annotations

from latentlab.benchmarks import morph, projection, structure


def test_morph_benchmark_runs_both_sides_and_writes_its_table(tmp_path, capsys):
    md = tmp_path / "bench.md"
    morph.main(["--frames", "4", "--threads", "1", "--batches", "4", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert "diffusers-loop" in out and "ratio to the per-frame diffusers loop" in out
    table = md.read_text().splitlines()
    assert table[-2].startswith("| diffusers-loop | 1 |") and table[-1].startswith("| latentlab | 4 |")
    assert all(len(row.split("|")) == 7 for row in table[-4:])  # 5 cells: no stray pipes


def test_projection_benchmark_runs_and_writes_its_table(tmp_path):
    md = tmp_path / "bench.md"
    projection.main(["--sizes", "400", "--dim", "64", "--threads", "1", "--no-warmup", "--markdown", str(md)])
    rows = [r for r in md.read_text().splitlines() if r.startswith("| 400 |")]
    assert [r.split("|")[2].strip() for r in rows] == [
        "PCA-50 scikit-learn (randomized)", "PCA-50 latentlab (torch)", "UMAP on raw data", "UMAP after PCA-50"]


def test_structure_measurement_runs_and_prints_its_table(capsys):
    structure.main(["--prompts", "16", "--seeds", "1", "2"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| space / projection |") and len(rows) == 3 + 6  # header, rule, chance, 6 spaces
    assert rows[-1].startswith("| noise / UMAP |")


def test_latency_benchmark_runs_and_writes_its_table(tmp_path, capsys):
    from latentlab.benchmarks import latency

    md = tmp_path / "bench.md"
    latency.main(["--threads", "1", "--repeats", "2", "--steps", "2", "--markdown", str(md)])
    assert "compute batch 1 (widgets)" in capsys.readouterr().out
    rows = [r for r in md.read_text().splitlines() if r.startswith("| compute batch 1")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 7
