"""Morph rendering on a tiny pipeline: exact frames, manifest, single-frame re-render, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from latentlab import cli
from latentlab.morph import Keyframe, MorphSettings, manifest_path, plan, render_frame, render_morph
from latentlab.video import read_video


def _settings(**kw):
    base = dict(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe(None, 3)), n_frames=9)
    base.update(kw)
    return MorphSettings(**base)


def test_plan_paths_are_independent_and_hit_keyframes(tiny_lab):
    s = _settings(prompt_interpolation="slerp", noise_easing="smoothstep")
    p = plan(tiny_lab, s)
    assert p.latents.shape == (9, 4, 8, 8) and len(p.conditioning) == 9
    assert torch.equal(p.latents[0], tiny_lab.noise(1)[0]) and torch.equal(p.latents[8], tiny_lab.noise(3)[0])
    cond = tiny_lab.encode_prompt(["a red star", "a blue ring"])
    torch.testing.assert_close(p.conditioning.prompt_embeds[0], cond.prompt_embeds[0])
    torch.testing.assert_close(p.conditioning.prompt_embeds[4], cond.prompt_embeds[1])
    torch.testing.assert_close(p.conditioning.prompt_embeds[8], cond.prompt_embeds[1])  # prompt carried over
    assert [f["noise_t"] for f in p.frames][:3] == [0.0, pytest.approx(0.15625), 0.5]
    assert [f["prompt_t"] for f in p.frames][:3] == [0.0, 0.25, 0.5]


def test_render_writes_video_and_manifest_that_recreates_frames(tiny_lab, tmp_path):
    out = render_morph(tiny_lab, _settings(), tmp_path / "m.mp4", batch_size=4, progress=False, upscale=2)
    frames, info = read_video(out)
    assert frames.shape == (9, 32, 32, 3)
    man = json.loads(manifest_path(out).read_text())
    assert man["model"] == tiny_lab.model_id and len(man["frames"]) == 9
    assert man["resolved_keyframes"][2] == {"prompt": "a blue ring", "seed": 3}
    assert man["scheduler"]["class"] == "DDIMScheduler"
    assert {"latentlab", "torch", "diffusers", "transformers"} <= set(man["versions"])
    p = plan(tiny_lab, _settings())
    batch = tiny_lab.generate(p.latents[4:8], p.conditioning[4:8])
    again = render_frame(tiny_lab, manifest_path(out), 5)
    torch.testing.assert_close(again, batch[1:2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"`index` must be < 9"):
        render_frame(tiny_lab, manifest_path(out), 9)


def test_settings_errors():
    with pytest.raises(ValueError, match="the first keyframe needs a prompt"):
        MorphSettings(keyframes=(Keyframe(seed=1), Keyframe("x")))
    with pytest.raises(ValueError, match=r"`keyframes` must be a tuple of at least 2"):
        MorphSettings(keyframes=(Keyframe("x"),))
    with pytest.raises(ValueError, match=r"`noise_interpolation` must be one of"):
        _settings(noise_interpolation="cubic")
    round_trip = MorphSettings.from_dict(_settings().to_dict())
    assert round_trip == _settings()


def test_cli_refuses_bad_input_before_loading_a_model(tmp_path, capsys, monkeypatch):
    def boom(model):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_load_lab", boom)
    existing = tmp_path / "m.mp4"
    existing.write_bytes(b"mine")
    assert cli.main(["morph", "a", "b", "-o", str(existing)]) == cli.EXIT_USAGE
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["morph", "a", "b", "-o", str(tmp_path / "m.avi")]) == cli.EXIT_USAGE
    assert cli.main(["morph", "a", "-o", str(tmp_path / "x.mp4")]) == cli.EXIT_USAGE
    assert "needs two keyframes" in capsys.readouterr().err
    assert cli.main(["morph", "a", "b", "c", "--seeds", "1", "2", "-o", str(tmp_path / "x.mp4")]) == cli.EXIT_USAGE
    assert existing.read_bytes() == b"mine"


def test_cli_renders_with_a_model_folder(tiny_sd_path, tmp_path):
    out = tmp_path / "walk.gif"
    code = cli.main(["morph", "a red star", "--seeds", "1", "2", "--loop", "--frames", "6", "--steps", "2",
                     "--model", str(tiny_sd_path), "-o", str(out)])
    assert code == 0
    frames, _ = read_video(out)
    assert frames.shape == (6, 16, 16, 3)
    assert json.loads(manifest_path(out).read_text())["settings"]["loop"] is True


def test_killed_render_resumes_with_identical_frames(tiny_lab, tmp_path, monkeypatch):
    from latentlab.morph import cache_dir

    s = _settings(n_frames=10)
    clean = render_morph(tiny_lab, s, tmp_path / "clean.mp4", batch_size=4, progress=False)
    out = tmp_path / "m.mp4"
    calls, original = [], tiny_lab.generate

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(*a, **k)

    monkeypatch.setattr(tiny_lab, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        render_morph(tiny_lab, s, out, batch_size=4, progress=False)
    assert not out.exists() and not manifest_path(out).exists()  # no half-written video
    assert len(list(cache_dir(out).glob("*.safetensors"))) == 8  # two finished batches kept
    monkeypatch.setattr(tiny_lab, "generate", original)
    generated = []
    monkeypatch.setattr(tiny_lab, "generate", lambda lat, *a, **k: generated.append(len(lat)) or original(lat, *a, **k))
    render_morph(tiny_lab, s, out, batch_size=4, progress=False)
    assert generated == [2]  # only the missing frames
    assert json.loads(manifest_path(out).read_text())["frames_reused_from_cache"] == 8
    np = pytest.importorskip("numpy")
    assert np.array_equal(read_video(out)[0], read_video(clean)[0])
    assert not cache_dir(out).exists()  # removed after success


def test_cache_keys_change_with_anything_that_changes_a_frame(tiny_lab):
    from latentlab.morph import frame_key

    p = plan(tiny_lab, _settings())
    lat, cond = p.inputs(0, 2)
    kw = dict(negative_prompt=None, num_inference_steps=3, guidance_scale=3.0)
    base = frame_key(tiny_lab, lat[:1], cond[0], **kw)
    assert base == frame_key(tiny_lab, lat[:1].clone(), cond[0], **kw)
    assert base != frame_key(tiny_lab, lat[1:2], cond[0], **kw)
    assert base != frame_key(tiny_lab, lat[:1], cond[1], **kw)
    assert base != frame_key(tiny_lab, lat[:1], cond[0], **{**kw, "num_inference_steps": 4})
    assert base != frame_key(tiny_lab, lat[:1], cond[0], **{**kw, "negative_prompt": "blurry"})
    with torch.no_grad():
        next(tiny_lab.pipe.unet.parameters()).view(-1)[0] += 1.0  # "retrained" model
    tiny_lab._fingerprint = None
    assert base != frame_key(tiny_lab, lat[:1], cond[0], **kw)


def test_even_pacing_spreads_change_evenly_and_keeps_keyframes(tiny_lab, tmp_path):
    from latentlab.morph import pixel_distance

    kf = (Keyframe("a red star", 1), Keyframe("a blue ring", 2))
    plain = _settings(keyframes=kf, n_frames=13)
    paced = _settings(keyframes=kf, n_frames=13, pacing="even", pacing_samples=12, pacing_steps=3)

    def spread(settings):
        p = plan(tiny_lab, settings)
        lat, cond = p.inputs(0, settings.n_frames)
        img = tiny_lab.generate(lat, cond)
        d = pixel_distance(img[:-1], img[1:])
        return (d.std() / d.mean()).item(), p

    cv_plain, _ = spread(plain)
    cv_paced, p = spread(paced)
    assert cv_paced < cv_plain
    assert p.frames[0]["noise_t"] == 0.0 and p.frames[-1]["noise_t"] == 1.0
    ts = [f["noise_t"] for f in p.frames]
    assert ts == sorted(ts) and ts != [f["noise_t"] for f in plan(tiny_lab, plain).frames]
    # A paced render's manifest re-creates a frame without re-running the previews.
    out = render_morph(tiny_lab, paced, tmp_path / "p.gif", progress=False)
    man = json.loads(manifest_path(out).read_text())
    assert man["pacing_distance"] == "pixel_distance"
    lat, cond = p.inputs(6, 7)
    torch.testing.assert_close(render_frame(tiny_lab, manifest_path(out), 6), tiny_lab.generate(lat, cond))


def test_cli_walk_grid_and_frame(tiny_sd_path, tmp_path, capsys):
    walk = tmp_path / "walk.mp4"
    assert cli.main(["walk", "a red star", "--seeds", "1", "2", "3", "--frames", "6", "--steps", "2",
                     "--model", str(tiny_sd_path), "-o", str(walk)]) == 0
    man = json.loads(manifest_path(walk).read_text())
    assert man["settings"]["loop"] is True and man["settings"]["noise_interpolation"] == "spline"
    assert read_video(walk)[0].shape == (6, 16, 16, 3)
    frame = tmp_path / "f.png"
    assert cli.main(["frame", str(manifest_path(walk)), "4", "-o", str(frame), "--upscale", "1"]) == 0
    import imageio.v3 as iio

    from latentlab.backend import Lab
    from latentlab.morph import render_frame

    lab = Lab.from_pretrained(tiny_sd_path, device="cpu")
    exact = (render_frame(lab, manifest_path(walk), 4)[0].permute(1, 2, 0) * 255).round()
    assert torch.equal(torch.from_numpy(iio.imread(frame)).float(), exact)
    # ... and it is that frame of the video (nearer to it than to any other frame, through the codec's loss).
    video = torch.from_numpy(read_video(walk)[0]).float()
    assert int((video - exact).abs().flatten(1).mean(1).argmin()) == 4
    big = tmp_path / "big.png"
    assert cli.main(["frame", str(manifest_path(walk)), "4", "-o", str(big), "--upscale", "2"]) == 0
    assert iio.imread(big).shape == (32, 32, 3)
    grid = tmp_path / "g.png"
    assert cli.main(["grid", "a red star", "a blue ring", "--seeds", "1", "2", "3", "--steps", "2",
                     "--model", str(tiny_sd_path), "-o", str(grid)]) == 0
    assert iio.imread(grid).shape == (16 * 2 + 2, 16 * 3 + 4, 3)
    assert json.loads(manifest_path(grid).read_text())["columns_seeds"] == [1, 2, 3]
    capsys.readouterr()
    # errors before any model work, with exit code 2
    assert cli.main(["walk", "a red star", "--seeds", "1", "-o", str(tmp_path / "w2.mp4")]) == cli.EXIT_USAGE
    assert "needs one prompt and at least two --seeds" in capsys.readouterr().err
    assert cli.main(["frame", str(manifest_path(walk)), "6", "-o", str(tmp_path / "x.png")]) == cli.EXIT_USAGE
    assert "INDEX must be in [0, 6), got 6" in capsys.readouterr().err
    assert cli.main(["frame", str(tmp_path / "nope.json"), "0"]) == cli.EXIT_USAGE
    assert cli.main(["grid", "a", "-o", str(grid)]) == cli.EXIT_USAGE
    assert "exists; pass --overwrite" in capsys.readouterr().err


_MEMORY_SCRIPT = """
import resource, sys, tempfile, pathlib, torch
torch.set_num_threads(1)
from latentlab.backend import Lab
from latentlab.morph import Keyframe, MorphSettings, render_morph
lab = Lab.from_pretrained(sys.argv[1], device="cpu")
n = int(sys.argv[2])
s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe(None, 3)), n_frames=n,
                  num_inference_steps=1, guidance_scale=1.0)
render_morph(lab, s, pathlib.Path(tempfile.mkdtemp()) / "long.mp4", batch_size=16, progress=False, upscale=8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_memory_stays_flat_over_a_1000_frame_render(tiny_sd_path):
    """Peak memory of a 1,000-frame render is that of a 100-frame one (frames stream to the encoder and the cache;
    inputs are computed per batch): 1,000 upscaled 128x128 frames would add ~47 MiB if they were held."""
    import subprocess
    import sys

    def peak(n):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tiny_sd_path), str(n)], capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    short, long = peak(100), peak(1000)
    assert long - short < 15, (short, long)


def test_image_keyframe_is_inverted_and_the_morph_starts_at_the_image(tmp_path):
    from latentlab import Lab
    from latentlab.embedded import world
    from latentlab.video import write_image

    lab = Lab.default()
    b = world.render_prompts([("large", "red", "ring", "white")], seed=3)
    img_path = write_image(tmp_path / "ring.png", b.images[0])
    s = MorphSettings(keyframes=(Keyframe("a large red ring on a white background", image=str(img_path)),
                                 Keyframe("a large blue star on a white background", 4)),
                      n_frames=4, num_inference_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a faithful inversion: no warning
        out = render_morph(lab, s, tmp_path / "m.mp4", progress=False)
    man = json.loads(manifest_path(out).read_text())
    note = man["image_keyframes"][0]
    assert note["keyframe"] == 0 and note["inversion_psnr_db"] > 20 and len(note["sha256"]) == 64
    first = render_frame(lab, manifest_path(out), 0)
    psnr = 10 * torch.log10(1 / (first - b.images).pow(2).mean())
    assert psnr > 18, float(psnr)  # the morph starts at (an approximation of) the image
    # Strong guidance makes DDIM inversion drift: the user is told, with the measured PSNR.
    strong = dataclasses.replace(s, guidance_scale=12.0, n_frames=2)
    with pytest.warns(RuntimeWarning, match=r"reproduces it at only \d+\.\d dB \(guidance_scale=12"):
        render_morph(lab, strong, tmp_path / "strong.mp4", progress=False)
    with pytest.raises(FileNotFoundError, match=r"`keyframes\[1\].image` does not exist"):
        MorphSettings(keyframes=(Keyframe("a"), Keyframe("b", image=str(tmp_path / "missing.png"))))
