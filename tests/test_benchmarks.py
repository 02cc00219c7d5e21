"""Smoke runs of the benchmark scripts (not timed tests: the numbers are in BENCHMARKS.md), so they cannot rot."""

from __future__ import annotations

import pytest

from latentlab.benchmarks import morph, projection, structure


@pytest.mark.slow
def test_morph_benchmark_runs_both_sides_and_writes_its_table(tmp_path, capsys):
    md = tmp_path / "bench.md"
    morph.main(["--frames", "4", "--threads", "1", "--batches", "4", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert "diffusers-loop" in out and "ratio to the per-frame diffusers loop" in out
    table = md.read_text().splitlines()
    assert table[-2].startswith("| diffusers-loop | 1 |") and table[-1].startswith("| latentlab | 4 |")
    assert all(len(row.split("|")) == 7 for row in table[-4:])  # 5 cells: no stray pipes


@pytest.mark.slow
def test_projection_benchmark_runs_and_writes_its_table(tmp_path):
    md = tmp_path / "bench.md"
    projection.main(["--sizes", "400", "--dim", "64", "--threads", "1", "--no-warmup", "--markdown", str(md)])
    rows = [r for r in md.read_text().splitlines() if r.startswith("| 400 |")]
    assert [r.split("|")[2].strip() for r in rows] == [
        "PCA-50 scikit-learn (randomized)", "PCA-50 latentlab (torch)", "UMAP on raw data", "UMAP after PCA-50"]


@pytest.mark.slow
def test_structure_measurement_runs_and_prints_its_table(capsys):
    structure.main(["--prompts", "16", "--seeds", "1", "2"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| space / projection |") and len(rows) == 3 + 6  # header, rule, chance, 6 spaces
    assert rows[-1].startswith("| noise / UMAP |")


@pytest.mark.slow
def test_latency_benchmark_runs_and_writes_its_table(tmp_path, capsys):
    from latentlab.benchmarks import latency

    md = tmp_path / "bench.md"
    latency.main(["--threads", "1", "--repeats", "2", "--steps", "2", "--scrub-frames", "4", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert "compute batch 1 (widgets)" in out and "scrubbing a finished 4-frame render" in out
    rows = [r for r in md.read_text().splitlines() if r.startswith("| compute batch 1")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 7
    from latentlab import embedded

    previews = [r.split("|") for r in md.read_text().splitlines() if r.startswith("| embedded-shapes")]
    # the full model, and the fast model at 1, 2 and 4 steps when it ships, each through generate and
    # generate_live (the widgets' call); every row a positive rate, p50 <= p95
    fast = embedded.is_available("embedded-shapes-fast")
    assert [r[1].strip() for r in previews] == ["embedded-shapes"] * 2 + ["embedded-shapes-fast"] * (6 * fast)
    assert [r[4].strip() for r in previews] == ["generate(batch_size=1)", "generate_live"] + [
        "generate(batch_size=1)", "generate_live(preview=True)"] * (3 * fast)
    assert all(float(r[5]) > 0 and float(r[6]) <= float(r[7]) for r in previews)
    assert all(r[9].strip() == "1.00x" for r in previews[::2])  # generate against itself
    parts = [r.split("|")[1].strip() for r in md.read_text().splitlines()
             if r.startswith("| ") and r.split("|")[1].strip() in ("encode prompt", "denoise", "decode (VAE)")]
    assert parts == ["encode prompt", "denoise", "decode (VAE)"] * embedded.is_available("embedded-shapes-fast")


@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu_counts_flops_that_add_up(tmp_path, capsys):
    """The GPU benchmark at its CPU smoke size: both sides run, the report names the device, and the FLOP count
    is the UNet's FLOPs per step (CFG batch 2; the cross-attention keys and values are computed at the first step
    only, so later steps cost less) plus one VAE decode -- checked by counting UNet calls and one decode
    separately."""
    import json

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentlab.backend import Lab
    from latentlab.benchmarks import gpu
    from latentlab.sampling import Sampling

    gpu.main(["--size", "tiny", "--frames", "3", "--steps", "2", "--threads", "1", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "ratio latentlab / per-frame loop:" in out and "MFU n/a" in out and "CPU" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["frames"] == 3 and r["latentlab_frames_per_s"] > 0 and r["loop_frames_per_s"] > 0 and r["mfu"] is None

    lab = Lab(pipe=gpu.build_pipeline("tiny", torch.device("cpu"), torch.float32), model_id="tiny")
    z, cond = lab.noise([1]), lab.encode_prompt("a cat")
    per_frame = {k: gpu.frame_flops(lab, z, cond, lab.sampling(Sampling(num_inference_steps=k, guidance_scale=7.5)))
                 for k in (2, 5)}
    from latentlab.backend.families.unet import cached_cross_attention

    emb = torch.cat([cond.prompt_embeds] * 2)
    with torch.no_grad(), cached_cross_attention(lab.pipe.unet):
        with FlopCounterMode(display=False) as first_call:
            lab.pipe.unet(torch.cat([z, z]), 10, encoder_hidden_states=emb)
        with FlopCounterMode(display=False) as later_call:
            lab.pipe.unet(torch.cat([z, z]), 10, encoder_hidden_states=emb)
    with FlopCounterMode(display=False) as decode:
        lab.decode(z, batch_size=1)
    assert later_call.get_total_flops() < first_call.get_total_flops()  # the cache saves real work
    assert per_frame[5] - per_frame[2] == 3 * later_call.get_total_flops()
    assert per_frame[2] == first_call.get_total_flops() + later_call.get_total_flops() + decode.get_total_flops()
    assert r["tflop_per_frame"] * 1e12 == pytest.approx(per_frame[2])
    assert gpu.peak_tflops(torch.device("cpu")) is None


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path, capsys):
    from latentlab.benchmarks import throughput

    throughput.main(["--frames", "6", "--repeats", "1", "--threads", "1", "--no-command",
                     "--markdown", str(tmp_path / "t.md")])
    out = capsys.readouterr().out
    assert "pipeline-batch16" in out and "latentlab-workers" in out and "max pixel diff" in out
    assert "latentlab-onnx-workers" in out
    table = (tmp_path / "t.md").read_text()
    assert table.count("| 6 |") == len(throughput.VARIANTS)


@pytest.mark.slow
def test_families_benchmark_smoke(capsys):
    """The per-family benchmark runs (tiny settings) and its FireFlow claim holds: 8 calls beat Euler's 24."""
    import json

    from latentlab.benchmarks import families

    families.main(["--families", "sd3", "flux", "flux2", "--images", "1", "--steps", "2", "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    for r in rows[:3]:
        assert r["invert_fireflow_7_steps"]["relative_rmse"] <= r["invert_euler_24_steps"]["relative_rmse"]
        assert r["latents"] == ([32, 8, 8] if r["family"] == "flux2" else [16, 8, 8])


def test_explainers_benchmark_runs_and_writes_its_table(tmp_path, capsys):
    from latentlab.benchmarks import explainers

    md = tmp_path / "bench.md"
    explainers.main(["--threads", "1", "--repeats", "1", "--steps", "3", "--toy-steps", "20",
                     "--models", "embedded-shapes", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert "scrubber on embedded-shapes (3 steps, 1 threads): on screen in" in out and "toy lab" in out
    rows = [r for r in md.read_text().splitlines() if r.startswith("| embedded-shapes |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9


@pytest.mark.slow
def test_morph_modes_benchmark_measures_every_mode_on_the_same_morphs(tmp_path, capsys):
    from latentlab.benchmarks import morph_modes

    md, js = tmp_path / "modes.md", tmp_path / "modes.json"
    morph_modes.main(["--pairs", "2", "--frames", "5", "--threads", "1", "--modes", "prompt slerp",
                      "--no-clip", "--markdown", str(md), "--json", str(js)])
    rows = [r for r in md.read_text().splitlines() if r.startswith("| ") and "---" not in r]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["default", "prompt slerp"]
    assert all(len(r.split("|")) == 12 for r in rows)  # 10 cells: no stray pipes
    assert "+0%" in rows[1]  # the default is its own baseline
    import json

    res = json.loads(js.read_text())["results"]
    for r in res.values():
        assert r["morphs"] == 2 and 0 <= r["clean"] <= 1 and 0 <= r["pixels"]["smoothness"] <= 1
        assert r["pixels"]["ppl"] > 0


@pytest.mark.slow
def test_map_fidelity_benchmark_measures_clicks_held_out_items_and_a_path(tmp_path):
    import json

    from latentlab.benchmarks import map_fidelity

    md, js = tmp_path / "map.md", tmp_path / "map.json"
    map_fidelity.main(["--prompts", "4", "--seeds", "1", "2", "--clicks", "2", "--spaces", "latents", "--methods",
                       "pca", "--candidates", "3", "--refine", "1", "--held-out", "0.25", "--path-frames", "4",
                       "--threads", "1", "--markdown", str(md), "--json", str(js)])
    row = [r for r in md.read_text().splitlines() if r.startswith("| latents/pca |")]
    assert len(row) == 1 and len(row[0].split("|")) == 9  # 7 cells: no stray pipes
    r = json.loads(js.read_text())["results"]["latents/pca"]
    assert r["reachable"]["clicks"] == 2 and 0 <= r["reachable"]["share_within_0.05"] <= 1
    assert r["clicks"]["clicks"] == 2 and r["held_out"]["held_out"] == 2 and r["path"]["search"]["frames"] == 4
    # the search includes the blend as a candidate: its median error is never above the blend's
    assert r["clicks"]["search"]["median_error"] <= r["clicks"]["baseline"]["median_error"] + 1e-9


@pytest.mark.slow
@pytest.mark.browser
def test_map_fps_benchmark_drives_the_real_canvas_at_each_size(tmp_path):
    """The map's own front-end module in chromium: every size is drawn whole, zoom and pan redraw it, and the table
    has one row per size with the baseline's ratio 1 (smoke: small sizes, short runs)."""
    import os
    import shutil

    from latentlab.benchmarks import map_fps

    if shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the map fps benchmark needs Debian's chromium (.ci/run installs it)")
        pytest.skip("no chromium here")
    rows = map_fps.measure((2_000, 20_000), seconds=0.5)
    assert [r["points"] for r in rows] == [2_000, 20_000]
    for r in rows:
        assert r["first_draw_ms"] > 0
        for kind in ("zoom", "pan"):
            assert r[kind]["fps"] > 0 and r[kind]["median_ms"] >= 0
    assert rows[0]["zoom"]["vs_baseline"] == rows[0]["pan"]["vs_baseline"] == 1.0
    md = tmp_path / "fps.md"
    map_fps.main(["--sizes", "1000", "--seconds", "0.3", "--markdown", str(md)])
    assert md.read_text().count("| 1,000 |") == 1


def test_the_maps_reachable_bound_is_never_worse_than_the_nearest_item():
    """The generation-free bound mixes pairs of a click's nearest items' vectors, the items themselves included
    (weights 0 and 1): on a PCA map (exact on the items) no click's bound is further than its nearest item."""
    import torch

    from latentlab.atlas import Atlas, AtlasMap
    from latentlab.benchmarks.map_fidelity import click_points, reachable

    g = torch.Generator().manual_seed(0)
    n = 12
    atlas = Atlas(torch.randn(n, 4, 2, 2, generator=g), torch.randn(n, 4, 2, 2, generator=g),
                  torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1), torch.randn(n, 8, generator=g),
                  torch.zeros(n, 3, 8, 8, dtype=torch.uint8), [{"prompt": f"p{i}", "seed": i} for i in range(n)], {})
    m = AtlasMap(atlas, space="latents", method="pca")
    r = reachable(m, 5, seed=3)
    nearest = sorted(m.nearest_item_distance(p.tolist()) for p in click_points(m, 5, seed=3))
    assert r["median_error"] <= nearest[2] + 1e-6
