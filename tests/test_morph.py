"""Morph rendering: plan, pacing, manifest, resume and cache on a fake backend (no diffusers); CLI, memory and
image keyframes on a tiny real pipeline and the embedded model."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from fakes import FakeBackend

from latentlab import cli
from latentlab.morph import Keyframe, MorphSettings, manifest_path, plan, render_frame, render_morph
from latentlab.sampling import Sampling
from latentlab.video import read_video


def _settings(**kw):
    base = dict(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe(None, 3)), n_frames=9)
    base.update(kw)
    return MorphSettings(**base)


@pytest.fixture(params=["unet", "flow"])
def fake(request):
    """The fake backend in the UNet layout (4 channels) and the flow layout (16 channels, pooled embeddings)."""
    return FakeBackend(layout=request.param)


def test_plan_paths_are_independent_and_hit_keyframes(fake):
    s = _settings(prompt_interpolation="slerp", noise_easing="smoothstep")
    p = plan(fake, s)
    assert p.latents.shape == (9, fake.channels, 4, 4) and len(p.conditioning) == 9
    assert torch.equal(p.latents[0], fake.noise(1)[0]) and torch.equal(p.latents[8], fake.noise(3)[0])
    cond = fake.encode_prompt(["a red star", "a blue ring"])
    torch.testing.assert_close(p.conditioning.prompt_embeds[0], cond.prompt_embeds[0])
    torch.testing.assert_close(p.conditioning.prompt_embeds[4], cond.prompt_embeds[1])
    torch.testing.assert_close(p.conditioning.prompt_embeds[8], cond.prompt_embeds[1])  # prompt carried over
    if fake.layout == "flow":  # every field of the conditioning follows the prompt path (SD3/Flux pooled embeds)
        torch.testing.assert_close(p.conditioning.pooled_prompt_embeds[4], cond.pooled_prompt_embeds[1])
    assert [f["noise_t"] for f in p.frames][:3] == [0.0, pytest.approx(0.15625), 0.5]
    assert [f["prompt_t"] for f in p.frames][:3] == [0.0, 0.25, 0.5]


def test_render_writes_video_and_manifest_that_recreates_frames(fake, tmp_path):
    out = render_morph(fake, _settings(sampling=Sampling(guidance_scale=3.0)), tmp_path / "m.mp4", progress=False,
                       upscale=2)
    frames, _ = read_video(out)
    assert frames.shape == (9, 16, 16, 3)
    man = json.loads(manifest_path(out).read_text())
    assert man["model"] == fake.model_id and len(man["frames"]) == 9 and man["manifest_version"] == 2
    assert man["resolved_keyframes"][2] == {"prompt": "a blue ring", "seed": 3}
    # The complete sampling settings the backend resolved, and its provenance (compute batch included).
    assert man["sampling"] == {"num_inference_steps": 4, "guidance_scale": 3.0, "negative_prompt": "",
                               "scheduler": fake.defaults.scheduler}
    assert man["backend"]["compute_batch"] == 4
    assert {"latentlab", "torch"} <= set(man["versions"])
    p = plan(fake, _settings())
    lat, cond = p.inputs(5, 6)
    again = render_frame(fake, manifest_path(out), 5)
    assert torch.equal(again, fake.generate(lat, cond, guidance_scale=3.0))
    with pytest.raises(ValueError, match=r"`index` must be < 9"):
        render_frame(fake, manifest_path(out), 9)


def test_render_calls_the_denoiser_once_per_compute_batch(fake, tmp_path):
    render_morph(fake, _settings(n_frames=10), tmp_path / "a.gif", progress=False)
    assert fake.calls == [4, 4, 2]  # 10 frames at the backend's compute batch 4; the last 2 not padded to 4
    # prediction mixing: the same calls, each denoising every frame with both of its prompts
    render_morph(fake, _settings(n_frames=10, prompt_interpolation="mix"), tmp_path / "mix.gif", progress=False)
    assert fake.calls[3:] == [8, 8, 4]
    man = json.loads(manifest_path(tmp_path / "a.gif").read_text())
    assert [f.get("compute_batch") for f in man["frames"]] == [None] * 8 + [2, 2]
    fake.calls.clear()
    render_frame(fake, manifest_path(tmp_path / "a.gif"), 9)
    assert fake.calls == [2]  # re-created at the size it was rendered at
    fake.calls.clear()
    fake.calls.clear()
    render_morph(fake, _settings(n_frames=10), tmp_path / "b.gif", batch_size=5, progress=False)
    assert fake.calls == [5, 5]
    assert json.loads(manifest_path(tmp_path / "b.gif").read_text())["backend"]["compute_batch"] == 5


def test_settings_errors():
    with pytest.raises(ValueError, match="the first keyframe needs a prompt"):
        MorphSettings(keyframes=(Keyframe(seed=1), Keyframe("x")))
    with pytest.raises(ValueError, match=r"`keyframes` must be a tuple of at least 2"):
        MorphSettings(keyframes=(Keyframe("x"),))
    with pytest.raises(ValueError, match=r"`noise_interpolation` must be one of"):
        _settings(noise_interpolation="cubic")
    with pytest.raises(ValueError, match=r"`n_frames` must be <= 1,000,000, got 100,000,000 \(its plan alone"):
        _settings(n_frames=100_000_000)
    round_trip = MorphSettings.from_dict(_settings(sampling=Sampling(7, 2.5, "x")).to_dict())
    assert round_trip == _settings(sampling=Sampling(7, 2.5, "x"))


def test_cli_refuses_bad_input_before_loading_a_model(tmp_path, capsys, monkeypatch):
    def boom(model):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_load_lab", boom)
    existing = tmp_path / "m.mp4"
    existing.write_bytes(b"mine")
    assert cli.main(["morph", "a", "b", "-o", str(existing)]) == cli.EXIT_USAGE
    assert "exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
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


def test_killed_render_resumes_with_identical_frames(fake, tmp_path, monkeypatch):
    from latentlab.morph import cache_dir

    s = _settings(n_frames=10)
    clean = render_morph(fake, s, tmp_path / "clean.mp4", progress=False)
    out = tmp_path / "m.mp4"
    calls, original = [], fake.generate

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(*a, **k)

    monkeypatch.setattr(fake, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        render_morph(fake, s, out, progress=False)
    assert not out.exists() and not manifest_path(out).exists()  # no half-written video
    assert len(list(cache_dir(out).glob("*.safetensors"))) == 8  # two finished batches kept
    assert not list(tmp_path.glob(".*.lock"))  # the lock is released
    monkeypatch.setattr(fake, "generate", original)
    fake.generated.clear()
    render_morph(fake, s, out, progress=False)
    assert fake.generated == [2]  # only the missing frames
    assert json.loads(manifest_path(out).read_text())["frames_reused_from_cache"] == 8
    np = pytest.importorskip("numpy")
    assert np.array_equal(read_video(out)[0], read_video(clean)[0])
    assert not cache_dir(out).exists()  # removed after success


def test_a_render_that_stopped_before_its_manifest_says_so_and_finishes_from_its_frames(fake, tmp_path,
                                                                                          monkeypatch):
    """The video was written, the manifest was not (a full disk): the next run names what happened instead of a bare
    "exists", and with overwrite finishes from the kept frames (no frame rendered again)."""
    import latentlab.morph.render as render_module
    from latentlab.morph import cache_dir

    s = _settings(n_frames=6)
    out = tmp_path / "m.gif"

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render_module, "write_manifest", full_disk)
    with pytest.raises(OSError, match="No space left"):
        render_morph(fake, s, out, progress=False)
    monkeypatch.undo()
    assert out.exists() and not manifest_path(out).exists()
    with pytest.raises(FileExistsError, match=r"exists without its manifest: an earlier render of it stopped before "
                                              r"writing the manifest, and .* keeps its 6 frame\(s\); pass overwrite"):
        render_morph(fake, s, out, progress=False)
    fake.generated.clear()
    render_morph(fake, s, out, progress=False, overwrite=True)
    assert fake.generated == [] and json.loads(manifest_path(out).read_text())["frames_reused_from_cache"] == 6
    assert not cache_dir(out).exists()
    out.unlink()
    manifest_path(out).unlink()
    out.write_bytes(b"mine")  # a user's file of that name, no frames of ours: the usual message
    with pytest.raises(FileExistsError, match="m.gif exists; pass overwrite=True"):
        render_morph(fake, s, out, progress=False)


def test_damaged_cache_entries_are_rendered_again_and_reported(fake, tmp_path, monkeypatch):
    from latentlab.morph import cache_dir

    s = _settings(n_frames=8)
    clean = render_morph(fake, s, tmp_path / "clean.mp4", progress=False)
    out = tmp_path / "m.mp4"
    render_morph(fake, s, tmp_path / "seed.mp4", progress=False, keep_cache=True)
    cache = cache_dir(tmp_path / "seed.mp4")
    cache.rename(cache_dir(out))
    files = sorted(cache_dir(out).glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated
    files[1].write_bytes(b"not a safetensors file at all")
    fake.generated.clear()
    with pytest.warns(RuntimeWarning, match=r"2 damaged frame\(s\) in the cache .* were rendered again"):
        render_morph(fake, s, out, progress=False)
    assert sum(fake.generated) == 2  # only the damaged frames were rendered again
    man = json.loads(manifest_path(out).read_text())
    assert man["damaged_cache_frames"] == 2 and man["frames_reused_from_cache"] == 6
    np = pytest.importorskip("numpy")
    assert np.array_equal(read_video(out)[0], read_video(clean)[0])


def test_a_second_render_to_the_same_output_is_refused_while_the_first_runs(fake, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from latentlab.morph import RenderLocked

    out = tmp_path / "m.mp4"
    # Another live process holds the lock.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".m.mp4.lock").write_text(str(holder.pid))
        with pytest.raises(RenderLocked, match=rf"another render \(process {holder.pid}\) is writing"):
            render_morph(fake, _settings(), out, progress=False)
        assert not out.exists() and not manifest_path(out).exists()
    finally:
        holder.kill()
        holder.wait()
    # A lock left by a process that is gone is taken over.
    render_morph(fake, _settings(), out, progress=False)
    assert out.exists() and not (tmp_path / ".m.mp4.lock").exists()
    assert os.getpid()


def test_cache_keys_change_with_anything_that_changes_a_frame(fake):
    from latentlab.morph import frame_key

    p = plan(fake, _settings())
    lat, cond = p.inputs(0, 2)
    s = fake.sampling()
    base = frame_key(fake, lat[:1], cond[0], s)
    assert base == frame_key(fake, lat[:1].clone(), cond[0], s)
    assert base != frame_key(fake, lat[1:2], cond[0], s)
    assert base != frame_key(fake, lat[:1], cond[1], s)
    assert base != frame_key(fake, lat[:1], cond[0], s.replace(num_inference_steps=5))
    assert base != frame_key(fake, lat[:1], cond[0], s.replace(negative_prompt="blurry"))
    assert base != frame_key(fake, lat[:1], cond[0], s.replace(scheduler="EulerAncestralDiscreteScheduler"))
    assert base != frame_key(fake, lat[:1], cond[0], s, batch_size=16)  # the compute batch is part of the key
    fake.weight = 2.0  # "retrained" model: another fingerprint
    assert base != frame_key(fake, lat[:1], cond[0], s)


def test_even_pacing_spreads_change_evenly_and_keeps_keyframes(fake, tmp_path):
    from latentlab.morph import pixel_distance

    kf = (Keyframe("a red star", 1), Keyframe("a blue ring", 2))
    plain = _settings(keyframes=kf, n_frames=13)
    paced = _settings(keyframes=kf, n_frames=13, pacing="even", pacing_samples=12, pacing_steps=3)

    def spread(settings):
        p = plan(fake, settings)
        lat, cond = p.inputs(0, settings.n_frames)
        img = fake.generate(lat, cond)
        d = pixel_distance(img[:-1], img[1:])
        return (d.std() / d.mean()).item(), p

    cv_plain, _ = spread(plain)
    cv_paced, p = spread(paced)
    assert cv_paced < cv_plain
    assert p.frames[0]["noise_t"] == 0.0 and p.frames[-1]["noise_t"] == 1.0
    ts = [f["noise_t"] for f in p.frames]
    assert ts == sorted(ts) and ts != [f["noise_t"] for f in plan(fake, plain).frames]
    # A paced render's manifest re-creates a frame without re-running the previews.
    out = render_morph(fake, paced, tmp_path / "p.gif", progress=False)
    man = json.loads(manifest_path(out).read_text())
    assert man["pacing_distance"] == "pixel_distance"
    lat, cond = p.inputs(6, 7)
    torch.testing.assert_close(render_frame(fake, manifest_path(out), 6), fake.generate(lat, cond))


def test_pacing_refinement_bisects_a_sharp_change(fake, monkeypatch):
    """A morph whose whole change happens in a narrow band of t (a sigmoid of width ~1/200 between two preview
    points): refinement rounds add previews inside the band, so the frames spread over it, and the largest
    frame-to-frame change falls against one-shot pacing. Every round is one batch."""
    from latentlab.backend import AttentionMix

    def step_images(latents, conditioning, *, sampling=None, **kw):
        assert isinstance(conditioning, AttentionMix)
        w = conditioning.weight.float()
        batches.append(len(w))
        return torch.sigmoid(200 * (w - 0.43)).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()

    monkeypatch.setattr(fake, "generate", step_images)
    kf = (Keyframe("a red star", 1), Keyframe("a blue ring", 2))
    jumps, calls = {}, {}
    for rounds in (0, 2):
        batches = []
        s = _settings(keyframes=kf, n_frames=17, pacing="even", prompt_interpolation="attention",
                      pacing_refine=rounds)
        p = plan(fake, s)
        calls[rounds] = list(batches)
        _, cond = p.inputs(0, 17)
        frames = step_images(None, cond)[:, 0, 0, 0]
        d = frames.diff().abs()
        jumps[rounds] = float(d.max() / d.mean())
        ts = [f["prompt_t"] for f in p.frames]
        assert ts[0] == 0.0 and ts[-1] == 1.0 and ts == sorted(ts)
    assert calls[0] == [9] and len(calls[2]) == 3 and all(n <= 4 for n in calls[2][1:])
    assert jumps[2] < 0.8 * jumps[0], jumps
    with pytest.raises(ValueError, match="pacing_refine"):
        _settings(pacing="even", pacing_refine=-1)


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
    assert "exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err


_MEMORY_SCRIPT = """
import resource, sys, tempfile, pathlib, torch
torch.set_num_threads(1)
from latentlab.backend import Lab
from latentlab.morph import Keyframe, MorphSettings, render_morph
from latentlab.sampling import Sampling
lab = Lab.from_pretrained(sys.argv[1], device="cpu")
n = int(sys.argv[2])
s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2), Keyframe(None, 3)), n_frames=n,
                  sampling=Sampling(num_inference_steps=1, guidance_scale=1.0))
render_morph(lab, s, pathlib.Path(tempfile.mkdtemp()) / "long.mp4", batch_size=16, progress=False, upscale=8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@pytest.mark.slow
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


@pytest.mark.slow
def test_image_keyframe_is_inverted_and_the_morph_starts_at_the_image(tmp_path):
    from latentlab import Lab
    from latentlab.embedded import world
    from latentlab.video import write_image

    lab = Lab.default()
    b = world.render_prompts([("large", "red", "ring", "white")], seed=3)
    img_path = write_image(tmp_path / "ring.png", b.images[0])
    s = MorphSettings(keyframes=(Keyframe("a large red ring on a white background", image=str(img_path)),
                                 Keyframe("a large blue star on a white background", 4)),
                      n_frames=4, sampling=Sampling(num_inference_steps=10))
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
    strong = dataclasses.replace(s, sampling=Sampling(num_inference_steps=10, guidance_scale=12.0), n_frames=2)
    with pytest.warns(RuntimeWarning, match=r"reproduces it at only \d+\.\d dB \(guidance_scale=12"):
        render_morph(lab, strong, tmp_path / "strong.mp4", progress=False)
    with pytest.raises(FileNotFoundError, match=r"`keyframes\[1\].image` does not exist"):
        MorphSettings(keyframes=(Keyframe("a"), Keyframe("b", image=str(tmp_path / "missing.png"))))


def test_cli_batch_size_does_no_more_unet_work_than_the_frames_need(tiny_lab, tmp_path, monkeypatch):
    """--batch-size 4 on 10 frames: UNet calls of 4, 4 and 2 items per step (the last, partial batch is not padded),
    not calls padded to 16 (v1 did 4x the work)."""
    items = []
    handle = tiny_lab.pipe.unet.register_forward_hook(lambda m, a, o: items.append(a[0].shape[0]))
    monkeypatch.setattr(cli, "_load_lab", lambda model: tiny_lab)
    try:
        assert cli.main(["morph", "a red star", "a blue ring", "--frames", "10", "--steps", "2", "--guidance", "1",
                         "--batch-size", "4", "--workers", "1", "--model", "unused", "-o", str(tmp_path / "m.gif")]) == 0
    finally:
        handle.remove()
    assert items == [4, 4, 4, 4, 2, 2]  # per batch of frames, 2 steps each
    man = json.loads(manifest_path(tmp_path / "m.gif").read_text())
    assert man["backend"]["compute_batch"] == 4 and man["sampling"]["guidance_scale"] == 1.0


def test_mix_keyframes_blend_seeds_and_prompts_and_round_trip_through_the_manifest(fake, tmp_path):
    from latentlab.morph import Mix
    from latentlab.ops import blend

    mix = Mix(seeds=(1, 2, 3), seed_weights=(0.5, 0.3, 0.2), prompts=("a red star", "a blue ring"),
              prompt_weights=(0.25, 0.75))
    s = MorphSettings(keyframes=(Keyframe("a red star", 7), Keyframe(mix=mix)), n_frames=5)
    p = plan(fake, s)
    torch.testing.assert_close(p.latents[-1], blend([fake.noise(i) for i in (1, 2, 3)], [0.5, 0.3, 0.2])[0])
    e = fake.encode_prompt(["a red star", "a blue ring"]).prompt_embeds
    cond = p.conditioning  # the default prompt path: attention, the last frame is b (the Mix keyframe) alone
    assert p.prompt_method == "attention" and float(cond.weight[-1]) == 1.0
    torch.testing.assert_close(cond.b.prompt_embeds[-1], 0.25 * e[0] + 0.75 * e[1])
    out = render_morph(fake, s, tmp_path / "mix.gif", progress=False)
    assert MorphSettings.from_dict(json.loads(manifest_path(out).read_text())["settings"]) == s
    lat, cond = p.inputs(4, 5)
    assert torch.equal(render_frame(fake, manifest_path(out), 4), fake.generate(lat, cond))
    with pytest.raises(ValueError, match=r"`mix.seed_weights` must have 3 weights"):
        Mix(seeds=(1, 2, 3), seed_weights=(1.0,), prompts=("a",), prompt_weights=(1.0,))


def test_worker_processes_render_the_same_frames_and_a_dead_worker_is_reported(tmp_path):
    """Two forked single-thread workers (taking chunks from a queue) give the one-process video bit for bit, and
    record who rendered what; a worker that fails stops the render with a clear error and leaves the cache."""
    from latentlab.morph import cache_dir
    from latentlab.morph.workers import WorkerFailed

    s = _settings(n_frames=22)
    one = render_morph(FakeBackend(), s, tmp_path / "one.gif", progress=False)
    two = render_morph(FakeBackend(), s, tmp_path / "two.gif", progress=False, workers=2)
    np = pytest.importorskip("numpy")
    assert np.array_equal(read_video(two)[0], read_video(one)[0])
    man = json.loads(manifest_path(two).read_text())
    assert man["workers"]["processes"] == 2 and man["workers"]["torch_threads_each"] == 1
    assert sum(man["workers"]["frames_rendered_by_worker"]) == 22 and man["frames_reused_from_cache"] == 0
    assert render_frame(FakeBackend(), manifest_path(two), 13).shape == (1, 3, 8, 8)

    class Dies(FakeBackend):
        def generate(self, latents, conditioning, **kw):
            if float(latents[0].abs().sum()) > 0 and len(latents) < 4:  # the last, short chunk
                raise RuntimeError("out of luck")
            return super().generate(latents, conditioning, **kw)

    out = tmp_path / "dies.gif"
    with pytest.raises(WorkerFailed, match=r"a render worker failed on the frames from 20: RuntimeError: out of luck"):
        render_morph(Dies(), s, out, progress=False, workers=2)
    assert not out.exists() and len(list(cache_dir(out).glob("*.safetensors"))) >= 4
    assert not list(tmp_path.glob(".*.lock"))
    render_morph(FakeBackend(), s, out, progress=False, workers=2)  # resumes
    assert np.array_equal(read_video(out)[0], read_video(one)[0])
    with pytest.raises(ValueError, match=r"`workers` must be"):
        render_morph(FakeBackend(), s, tmp_path / "x.gif", progress=False, workers=0)


def test_workers_balance_their_batches_when_the_batch_size_is_the_backends(tmp_path):
    """48 frames at compute batch 16 on 2 workers would leave one worker idle a third of the time: the render uses
    4 batches of 12 instead (recorded as the compute batch); an explicit batch size is kept."""
    s = _settings(n_frames=48)
    out = render_morph(FakeBackend(compute_batch=16), s, tmp_path / "a.gif", progress=False, workers=2)
    man = json.loads(manifest_path(out).read_text())
    done = man["workers"]["frames_rendered_by_worker"]
    assert man["backend"]["compute_batch"] == 12 and sum(done) == 48 and all(d % 12 == 0 for d in done)
    out = render_morph(FakeBackend(compute_batch=16), s, tmp_path / "b.gif", progress=False, workers=2, batch_size=16)
    assert json.loads(manifest_path(out).read_text())["backend"]["compute_batch"] == 16


def test_a_failed_encode_keeps_the_previous_video_manifest_and_cache(tiny_sd_path, tmp_path, capsys, monkeypatch):
    """--overwrite with an encoder failure (ffmpeg exits 1 at the end) ends non-zero and destroys nothing."""
    from test_video import failing_ffmpeg

    from latentlab.cli import main

    out = tmp_path / "m.mp4"
    args = ["morph", "a red star", "a blue ring", "--model", str(tiny_sd_path), "--frames", "4", "--steps", "2",
            "--workers", "1", "-o", str(out)]
    assert main(args) == 0
    video, man = out.read_bytes(), manifest_path(out).read_text()
    capsys.readouterr()
    failing_ffmpeg(tmp_path, monkeypatch)
    assert main([*args, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "ffmpeg failed to encode m.mp4" in err and "existing file is untouched" in err
    assert out.read_bytes() == video and manifest_path(out).read_text() == man
    cache = tmp_path / ".m.mp4.frames"
    assert cache.is_dir() and any(cache.iterdir())  # the rendered frames are kept: fix the option and resume


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "SIGINT"])
@pytest.mark.slow
def test_a_terminated_render_leaves_no_worker_running_and_resumes(tmp_path, how):
    """kill / timeout / a scheduler's SIGTERM (or SIGKILL) on a render with workers: no worker outlives it, the
    finished frames stay in the cache, and the same render resumes to the same video."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from latentlab.video import read_video

    psutil = pytest.importorskip("psutil")
    script = tmp_path / "render.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from fakes import FakeBackend\n"
        "from latentlab.morph import Keyframe, MorphSettings, render_morph\n"
        "class Slow(FakeBackend):\n"
        "    def generate(self, *a, **k):\n"
        "        time.sleep(0.3)\n"
        "        return super().generate(*a, **k)\n"
        "s = MorphSettings(keyframes=(Keyframe('a red star', 1), Keyframe('a blue ring', 2)), n_frames=400)\n"
        "render_morph(Slow(), s, sys.argv[1], progress=False, workers=2)\n")
    out = tmp_path / "m.gif"
    proc = subprocess.Popen([sys.executable, str(script), str(out)])
    parent = psutil.Process(proc.pid)
    end = time.time() + 60
    while len(parent.children()) < 2 and time.time() < end:
        time.sleep(0.05)
    workers = parent.children()
    assert len(workers) >= 2
    time.sleep(1.0)  # some chunks finish
    proc.send_signal(getattr(signal, how))
    assert proc.wait(timeout=30) != 0
    _gone, alive = psutil.wait_procs(workers, timeout=3)  # the rest of the render would take ~15 s
    assert not alive, f"workers still running after {how}: {[p.pid for p in alive]}"
    assert not out.exists()
    from latentlab.morph import Keyframe, MorphSettings

    s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2)), n_frames=400)
    done = render_morph(FakeBackend(), s, out, progress=False)
    man = json.loads(manifest_path(done).read_text())
    assert man["frames_reused_from_cache"] > 0 and not list(tmp_path.glob(".*.lock"))
    assert np.array_equal(read_video(done)[0], read_video(render_morph(FakeBackend(), s, tmp_path / "b.gif",
                                                                        progress=False))[0])


def test_cli_grid_batch_size_is_bounded_by_the_images(tiny_lab, tmp_path, monkeypatch):
    """--batch-size 100000 for a 1x2 grid: calls of 2 items, not 100,000 (which padded every call, or crashed)."""
    items = []
    handle = tiny_lab.pipe.unet.register_forward_hook(lambda m, a, o: items.append(a[0].shape[0]))
    monkeypatch.setattr(cli, "_load_lab", lambda model: tiny_lab)
    try:
        assert cli.main(["grid", "a red star", "--seeds", "1", "2", "--steps", "2", "--guidance", "1",
                         "--batch-size", "100000", "--model", "unused", "-o", str(tmp_path / "g.png")]) == 0
    finally:
        handle.remove()
    assert items == [2, 2]
    assert json.loads(manifest_path(tmp_path / "g.png").read_text())["backend"]["compute_batch"] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["frames"][3].pop("noise_t"), r"`frames\[3\].noise_t` must be a number in \[0, 1\], got None"),
    (lambda m: m["frames"][2].update(noise_segment=7), r"`frames\[2\].noise_segment` must be an integer in \[0, 2\)"),
    (lambda m: m["frames"].__setitem__(1, "x"), r"`frames\[1\]` must be an object, got str"),
    (lambda m: m.update(backend=[]), r"`backend` must be an object, got list"),
    (lambda m: m["backend"].update(compute_batch="16"), r"`backend.compute_batch` must be a non-negative integer"),
    (lambda m: m["frames"][0].update(compute_batch=0), r"`frames\[0\].compute_batch` must be a positive integer"),
    (lambda m: m.update(image_keyframes=[{"keyframe": "0"}]), r"`image_keyframes` must list objects"),
])
def test_a_damaged_manifest_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, edit, message):
    out = render_morph(FakeBackend(), _settings(), tmp_path / "m.gif", progress=False)
    man = json.loads(manifest_path(out).read_text())
    edit(man)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(man))
    monkeypatch.setattr(cli, "_load_lab", lambda *a: pytest.fail("a model was loaded"))
    assert cli.main(["frame", str(bad), "0", "-o", str(tmp_path / "f.png")]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
