"""Exports: every file read back by the reader the other tool uses (ComfyUI's LoadLatent arithmetic, written out
here independently), Deforum schedules round-trip into the same morph, directions as plain .npy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import FakeBackend
from safetensors.torch import load_file

from latentlab import exports
from latentlab.atlas import prompt_direction
from latentlab.backend import Conditioning
from latentlab.morph import Keyframe, MorphSettings, plan
from latentlab.sampling import Sampling


def comfyui_load_latent(path):
    """ComfyUI's nodes.LoadLatent.load, as it is written there."""
    latent = load_file(str(path), device="cpu")
    multiplier = 1.0
    if "latent_format_version_0" not in latent:
        multiplier = 1.0 / 0.18215
    return {"samples": latent["latent_tensor"].float() * multiplier}


def test_comfyui_latent_is_what_loadlatent_reads(tmp_path):
    z = torch.randn(5, 4, 8, 8)
    path = exports.write_comfyui_latent(z, tmp_path / "noise.latent", scaling_factor=0.13025)
    samples = comfyui_load_latent(path)["samples"]
    torch.testing.assert_close(samples * 0.13025, z)  # ComfyUI's model scales its samples by the VAE factor
    torch.testing.assert_close(exports.read_comfyui_latent(path, scaling_factor=0.13025), z)
    with pytest.raises(FileExistsError, match="exists"):
        exports.write_comfyui_latent(z, path, scaling_factor=0.13025)
    with pytest.raises(ValueError, match=r"`path` must end in one of \('.latent',\)"):
        exports.write_comfyui_latent(z, tmp_path / "noise.pt", scaling_factor=0.13025)
    with pytest.raises(ValueError, match="scaling_factor"):
        exports.write_comfyui_latent(z, tmp_path / "b.latent", scaling_factor=0.0)


def test_comfyui_conditioning_has_comfyuis_structure(tmp_path):
    cond = Conditioning(torch.randn(3, 77, 32), torch.randn(3, 16))
    path = exports.write_comfyui_conditioning(cond, tmp_path / "c.safetensors")
    back = exports.read_comfyui_conditioning(path)
    assert len(back) == 3 and back[1][0].shape == (1, 77, 32) and back[1][1]["pooled_output"].shape == (1, 16)
    torch.testing.assert_close(torch.cat([c for c, _ in back]), cond.prompt_embeds)
    torch.testing.assert_close(torch.cat([d["pooled_output"] for _, d in back]), cond.pooled_prompt_embeds)
    no_pool = exports.read_comfyui_conditioning(
        exports.write_comfyui_conditioning(Conditioning(torch.randn(2, 77, 8)), tmp_path / "d.safetensors"))
    assert no_pool[0][1] == {}


@pytest.mark.parametrize("n_frames,loop", [(48, False), (31, False), (40, True)])
def test_deforum_schedule_round_trips_and_marks_the_keyframe_frames(tmp_path, n_frames, loop):
    s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 7), Keyframe("a green cross", 3)),
                      n_frames=n_frames, fps=8.0, loop=loop, noise_interpolation="lerp",
                      sampling=Sampling(num_inference_steps=12, guidance_scale=5.5, scheduler="EulerDiscreteScheduler",
                                        negative_prompt="blurry"))
    path = exports.write_deforum_schedule(s, tmp_path / "deforum.json")
    doc = json.loads(path.read_text())
    assert doc["seed_schedule"].count(":") == 3 and doc["cfg_scale_schedule"] == "0:(5.5)"
    back = exports.read_deforum_schedule(path)
    assert back == s
    # The frames named in the schedule are the frames nearest each keyframe: where a keyframe falls on a frame,
    # that frame's noise is exactly the keyframe's seed noise.
    fake = FakeBackend()
    p = plan(fake, s)
    frames = list(map(int, doc["prompts"]))
    assert frames[0] == 0 and frames == sorted(frames)
    for j, (frame, seed) in enumerate(zip(frames, (1, 7, 3))):
        rec = p.frames[frame]
        exact = rec["noise_segment"] + rec["noise_t"] == j or (j == 2 and not loop and frame == n_frames - 1)
        if exact:
            assert torch.equal(p.inputs(frame, frame + 1)[0][0], fake.noise(seed)[0])
        else:
            n_seg, denom = (3, n_frames) if loop else (2, n_frames - 1)
            assert abs(rec["noise_segment"] + rec["noise_t"] - j) <= 0.5 * n_seg / denom + 1e-9  # half a frame
    with pytest.raises(ValueError, match=r"is not a Deforum schedule \(\"0:\(v\), 24:\(w\)\"\): bad entry 'x'"):
        path.write_text(json.dumps({**doc, "seed_schedule": "0:(1), x"}))
        exports.read_deforum_schedule(path)


def test_directions_are_plain_npy_and_pickles_are_refused(tmp_path):
    fake = FakeBackend()
    d = prompt_direction(fake, "a green star", "a red star")
    path = exports.save_direction(d, tmp_path / "red-to-green.npy")
    arr = np.load(path, allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == tuple(d.prompt_embeds.shape)
    torch.testing.assert_close(exports.load_direction(path), d.prompt_embeds)
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="is not a plain numeric .npy array"):
        exports.load_direction(tmp_path / "evil.npy")


@pytest.mark.slow
def test_cli_export_of_a_rendered_morph(tmp_path, capsys):
    from latentlab import Lab, cli

    out = tmp_path / "m.gif"
    assert cli.main(["morph", "a red star", "a blue ring", "--frames", "6", "--steps", "3", "--prompt-interp", "lerp",
                     "-o", str(out)]) == 0
    folder = tmp_path / "exp"
    assert cli.main(["export", f"{out}.json", "-o", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["conditioning.safetensors", "deforum.json", "noise.latent"]
    lab = Lab.default()
    s = MorphSettings(keyframes=(Keyframe("a red star", 0), Keyframe("a blue ring", 0)), n_frames=6,
                      prompt_interpolation="lerp", sampling=Sampling(num_inference_steps=3))
    lat, cond = plan(lab, s).inputs(0, 6)
    scale = lab.pipe.vae.config.scaling_factor
    torch.testing.assert_close(comfyui_load_latent(folder / "noise.latent")["samples"] * scale, lat)
    torch.testing.assert_close(torch.cat([c for c, _ in exports.read_comfyui_conditioning(
        folder / "conditioning.safetensors")]), cond.prompt_embeds)
    assert exports.read_deforum_schedule(folder / "deforum.json").keyframes == s.keyframes
    assert cli.main(["export", f"{out}.json", "-o", str(folder)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    # A morph that mixes two prompts' predictions per frame: noise and keyframes export, the conditioning cannot
    # (said on stderr), and the Deforum schedule keeps the prompt path's name.
    mixed = tmp_path / "mixed.gif"
    assert cli.main(["morph", "a red star", "a blue ring", "--frames", "6", "--steps", "3", "--prompt-interp", "mix",
                     "-o", str(mixed)]) == 0
    folder = tmp_path / "exp-mixed"
    assert cli.main(["export", f"{mixed}.json", "-o", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["deforum.json", "noise.latent"]
    assert "conditioning.safetensors not written" in capsys.readouterr().err
    assert exports.read_deforum_schedule(folder / "deforum.json").prompt_interpolation == "mix"


_KILLED_EXPORTS = """
import os, sys, time
import torch
from pathlib import Path
import latentlab._files as files
from latentlab.exports import write_comfyui_latent
calls = [0]
real_replace = os.replace
def replace(src, dst):  # the moment between a complete temporary file and its rename: where the kill lands
    calls[0] += 1
    if calls[0] == {stop}:
        print("renaming", flush=True)
        time.sleep(600)
    real_replace(src, dst)
files.os.replace = replace
for i in range(10_000):
    z = torch.full((16, 4, 64, 64), float(i % 5))
    write_comfyui_latent(z, Path({folder!r}) / f"out-{{i % 5}}.latent", scaling_factor=1.0, overwrite=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, draw", [("SIGKILL", 0), ("SIGKILL", 1), ("SIGKILL", 2), ("SIGTERM", 3), ("SIGINT", 4)])
def test_kill_9_mid_export_leaves_only_whole_files_and_the_next_export_cleans_up(tmp_path, sig, draw):
    """SIGKILL (or SIGTERM, or Ctrl-C) a process that keeps re-exporting ComfyUI latents at a seeded random export,
    just before its temporary file would be renamed: every file under a final name reads back whole and right, the
    killed writer's temporary file is there (Ctrl-C: already removed by the writer itself), and the next export of
    that name removes it."""
    import random
    import signal
    import subprocess
    import sys

    stop = random.Random(500 + draw).randrange(1, 12)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORTS.format(folder=str(tmp_path), stop=stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "renaming"
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(30) != 0
    assert len(list(tmp_path.glob(".*.partial.latent"))) == (0 if sig == "SIGINT" else 1)
    finals = sorted(tmp_path.glob("out-*.latent"))
    assert len(finals) == min(5, stop - 1)
    for f in finals:
        k = int(f.stem.split("-")[1])
        z = exports.read_comfyui_latent(f, scaling_factor=1.0)
        assert z.shape == (16, 4, 64, 64) and bool((z == k).all())
    for k in range(5):
        exports.write_comfyui_latent(torch.zeros(1, 4, 8, 8), tmp_path / f"out-{k}.latent", scaling_factor=1.0,
                                     overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]
