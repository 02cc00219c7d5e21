"""The embedded model's world, evaluator and a few-step smoke run of every training stage (the real run is a
developer's job: see latentlab/embedded/MODEL_CARD.md)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from latentlab.embedded import evaluate, train, world


def test_world_is_seeded_and_captioned():
    a, b = world.sample(8, seed=3), world.sample(8, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, world.sample(8, seed=4).images)
    assert a.images.min() >= 0 and a.images.max() <= 1
    for cap, attr in zip(a.captions, a.attributes):
        assert cap == world.caption(attr["size"], attr["colour"], attr["shape"], attr["background"])
        assert attr["colour"] != attr["background"]


def test_held_out_prompts_are_never_trained_on():
    held, trained = set(world.held_out_prompts()), set(world.training_prompts())
    assert len(held) == world.N_HELD_OUT >= 256
    assert not held & trained and len(held | trained) == len(world.all_prompts()) == 1008
    b = world.sample(200, seed=0, prompts=world.training_prompts())
    assert not {tuple(x[k] for k in ("size", "colour", "shape", "background")) for x in b.attributes} & held
    # Every attribute pair is still seen in training (compositional generalisation, not extrapolation).
    for i, j in [(1, 2), (1, 3), (2, 3)]:
        pairs = {(p[i], p[j]) for p in world.all_prompts()}
        assert pairs == {(p[i], p[j]) for p in trained}


def test_evaluator_reads_colours_from_rendered_images():
    b = world.sample(32, seed=11)
    bgs, fgs, masks = evaluate.segment(b.images)
    assert bgs == [a["background"] for a in b.attributes]
    assert fgs == [a["colour"] for a in b.attributes]
    assert masks.shape == (32, 64, 64) and masks.any(dim=(1, 2)).all()
    assert evaluate.score([{"background": "red", "colour": "blue", "shape": "star", "size": "small"}],
                          [{"background": "red", "colour": "blue", "shape": "ring", "size": "small"}]) == {
        "background": 1.0, "colour": 1.0, "shape": 0.0, "size": 1.0, "all": 0.0, "all_but_size": 0.0}


def test_evaluator_reads_sizes_from_rendered_images():
    """The size word from the blob's circumradius: right on rendered images (the evaluator's own error)."""
    b = world.sample(96, seed=12)
    _, _, masks = evaluate.segment(b.images)
    sizes = evaluate.size_names(evaluate.blob_radius(masks))
    right = sum(s == a["size"] for s, a in zip(sizes, b.attributes))
    assert right >= 0.95 * 96, right


@pytest.mark.slow
def test_evaluator_shape_classifier_learns_shapes_and_ignores_the_thread_count():
    # Short run (the evaluator trains 400 steps: 99-100 % on held-out renders); 100 steps measured 90.6 %.
    net, acc = evaluate.train_shape_classifier(steps=100)
    assert acc >= 0.8, acc
    b = world.sample(64, seed=5)
    truth = [a["shape"] for a in b.attributes]
    assert sum(p["shape"] == t for p, t in zip(evaluate.attributes(b.images, net), truth)) >= 0.75 * 64
    # Trained on one thread whatever the caller's setting: the same classifier, bit for bit.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, _ = evaluate.train_shape_classifier(steps=10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    b_, _ = evaluate.train_shape_classifier(steps=10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b_.state_dict().values()))


def test_rectangle_splices_join_two_images_inside_a_region_and_free_only_its_border():
    x = torch.rand(6, 3, 64, 64)
    z = torch.randn(6, 4, 8, 8)
    w = 1 + torch.rand(6, 1, 64, 64)
    sizes = set()
    for seed in range(12):  # one spliced item (0), joined with item 5 (torch.roll by one), in many rectangles
        xs, zs, ws = train.splice(x, z, w, 1 / 6, torch.Generator().manual_seed(seed), rectangles=1.0)
        assert torch.equal(zs[1:], z[1:]) and torch.equal(xs[1:], x[1:]) and torch.equal(ws[1:], w[1:])
        inside = (zs[0] == z[5]).all(0)
        assert inside.any() and not inside.all()
        rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        box = torch.zeros(8, 8, dtype=torch.bool)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(inside, box) and torch.equal(zs[0][:, ~box], z[0][:, ~box])  # one rectangle of the grid
        sizes.add(int(box.sum()))
        pix = box.repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.equal(xs[0][:, pix], x[5][:, pix]) and torch.equal(xs[0][:, ~pix], x[0][:, ~pix])
        free = ws[0, 0] == 0
        # no loss exactly within half a latent pixel (4 px) of the rectangle's border, everything else kept
        d_in = torch.nn.functional.max_pool2d((~pix)[None, None].float(), 9, 1, 4)[0, 0] > 0
        d_out = torch.nn.functional.max_pool2d(pix[None, None].float(), 9, 1, 4)[0, 0] > 0
        assert torch.equal(free, d_in & d_out)
        assert torch.equal(ws[0, 0][~free], torch.where(pix, w[5, 0], w[0, 0])[~free])
    assert len(sizes) > 5  # rectangles of many sizes
    # rectangles=0 is the v2 recipe, draw for draw
    a = train.splice(x, z, w, 0.5, torch.Generator().manual_seed(9))
    b = train.splice(x, z, w, 0.5, torch.Generator().manual_seed(9), rectangles=0.0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_edge_loss_is_zero_for_a_perfect_reconstruction_and_grows_with_blur():
    x = world.sample(4, seed=5).images
    w = train.foreground_weights(x, 9.0)
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert float(train.edge_loss(x, x, w)) == 0
    assert float(train.edge_loss(blur, x, w)) > float(train.edge_loss((x + blur) / 2, x, w)) > 0


class _GridVAE:
    """A VAE whose latent pixel is its 8x8 patch's mean colour and whose decoder upsamples (perfectly local), plus
    ``leak`` times the image-wide mean latent (not local)."""

    def __init__(self, leak: float):
        self.leak = leak

    def encode(self, x):
        from types import SimpleNamespace

        m = torch.nn.functional.avg_pool2d(x, 8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.cat([m, m[:, :1]], 1)))

    def decode(self, z):
        from types import SimpleNamespace

        up = torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")
        return SimpleNamespace(sample=up + self.leak * z[:, :3].mean((2, 3), keepdim=True))


def test_region_locality_is_zero_for_a_local_decoder_and_catches_a_leak_in_every_region():
    local = evaluate.decoder_locality_regions(_GridVAE(0.0), n=4)
    assert set(local) == {*evaluate.LOCALITY_REGIONS, "worst"} and local["worst"] == 0
    leaky = evaluate.decoder_locality_regions(_GridVAE(0.5), n=4)
    assert all(v > 0.005 for v in leaky.values()) and leaky["worst"] == max(leaky.values())
    lat, keep = evaluate.region_masks(8, 8, evaluate.LOCALITY_REGIONS["centred square"], seam=1)
    assert int(lat.sum()) == 16 and int((~keep).sum()) == 36 * 64  # the 4x4 square and its 1-pixel ring, in pixels


@pytest.mark.slow
def test_the_adversarial_decoder_stage_trains_both_networks_and_resumes(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    common = ["--out", str(out), "--threads", str(torch.get_num_threads()), "--batch", "4"]
    train.main(["vae", "--steps", "1", *common])
    adv = ["--adversarial", "0.5", "--adversarial-start", "1", "--splice", "0.5", "--splice-rectangles", "1"]
    train.main(["decoder", "--steps", "2", *adv, *common])
    ck = out / "decoder-ckpt"
    d1, m1 = load_file(ck / "disc.safetensors"), load_file(ck / "model.safetensors")
    train.main(["decoder", "--steps", "4", *adv, *common])  # resumes: discriminator, decoder and optimizer
    d2, m2 = load_file(ck / "disc.safetensors"), load_file(ck / "model.safetensors")
    assert json.loads((ck / "meta.json").read_text())["step"] == 4
    assert any(not torch.equal(d1[k], d2[k]) for k in d1)
    changed = {k.split(".")[0] for k in m1 if not torch.equal(m1[k], m2[k])}
    assert changed == {"decoder", "post_quant_conv"} or changed == {"decoder"}  # the encoder stays frozen
    disc = train.PatchDiscriminator()
    assert disc(torch.rand(2, 3, 64, 64)).shape == (2, 1, 8, 8)


@pytest.mark.slow
def test_every_training_stage_runs_and_packages_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.conftest import _tiny_tokenizer

    tok_dir = tmp_path / "tok"
    _tiny_tokenizer(tok_dir).save_pretrained(tok_dir)
    out = tmp_path / "run"
    common = ["--out", str(out), "--tokenizer", str(tok_dir), "--threads", str(torch.get_num_threads())]
    train.main(["vae", "--steps", "2", "--batch", "4", *common])
    train.main(["clip", "--steps", "2", "--batch", "8", *common])
    train.main(["unet", "--steps", "2", "--batch", "4", *common])
    train.main(["unet", "--steps", "3", "--batch", "4", *common])  # resumes from the checkpoint
    assert json.loads((out / "unet-ckpt" / "meta.json").read_text())["step"] == 3
    before = json.loads((out / "unet-scaling.json").read_text())
    # Fine-tune the decoder, then the whole VAE; the UNet then continues on the new latents with a new scaling.
    train.main(["decoder", "--steps", "2", "--batch", "4", *common])
    train.main(["decoder", "--steps", "3", "--batch", "4", "--splice", "0.5", "--splice-rectangles", "1",
                "--small-share", "0.5", "--edge-weight", "1", *common])  # the v3 decoder options, resumed
    train.main(["vae2", "--steps", "2", "--batch", "4", *common])
    assert train.latest_vae_stage(out) == "vae2"
    train.main(["unet", "--steps", "4", "--batch", "4", "--fg-weight", "2", *common])
    train.main(["unet", "--steps", "5", "--batch", "4", "--small-share", "0.5", *common])  # the v3 UNet option
    after = json.loads((out / "unet-scaling.json").read_text())
    assert after["vae_stage"] == "vae2" and after["latent_std"] != before["latent_std"]
    train.main(["package", "--package-to", str(tmp_path / "model"), *common])
    assert not list((tmp_path / "model").rglob("*.bin")) and not list((tmp_path / "model").rglob("*.pt"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red star", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert 0.05 < pipe.vae.config.scaling_factor < 5  # set from the data, not SD's 0.18215
    # Unpack the packaged model and keep training from it (no original checkpoints needed).
    again = tmp_path / "again"
    train.main(["unpack", "--out", str(again), "--package-to", str(tmp_path / "model"), "--tokenizer", str(tok_dir),
                "--threads", str(torch.get_num_threads()), "--decoder-step", "7", "--decoder-minutes", "0.5"])
    train.main(["unet", "--steps", "1", "--batch", "4", "--out", str(again), "--tokenizer", str(tok_dir),
                "--threads", str(torch.get_num_threads())])
    assert json.loads((again / "unet-ckpt" / "meta.json").read_text())["step"] == 1
    # The decoder continues as a run at the given step and minutes (the v3 recipe's decoder stage).
    assert json.loads((again / "decoder-ckpt" / "meta.json").read_text())["elapsed"] == 30.0
    train.main(["decoder", "--steps", "8", "--batch", "2", "--out", str(again), "--tokenizer", str(tok_dir),
                "--threads", str(torch.get_num_threads())])
    assert json.loads((again / "decoder-ckpt" / "meta.json").read_text())["step"] == 8


@pytest.mark.slow
def test_flow_twin_recipe_smoke_train_package_load_unpack(tmp_path):
    """A few steps of the flow twin's recipe, packaged, load with a plain DiffusionPipeline and generate; the
    collapsed-pad training attention equals the pipeline's 256 zero tokens; unpack resumes from a package."""
    from diffusers import DiffusionPipeline

    from latentlab.embedded import train_flow

    out, pkg = tmp_path / "runs", tmp_path / "model-flow"
    train_flow.main(["train", "--out", str(out), "--steps", "2", "--batch", "4"])
    train_flow.main(["package", "--out", str(out), "--package-to", str(pkg)])
    pipe = DiffusionPipeline.from_pretrained(pkg)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=2, output_type="pt").images
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and image.shape == (1, 3, 64, 64)
    tok, te1, te2 = train_flow.text_encoders()
    assert train_flow.check_collapse(pipe.transformer, tok, te1, te2) < 1e-4
    train_flow.main(["unpack", "--out", str(tmp_path / "again"), "--package-to", str(pkg)])
    train_flow.main(["train", "--out", str(tmp_path / "again"), "--steps", "1", "--batch", "2"])
    assert json.loads((tmp_path / "again" / "flow-ckpt" / "meta.json").read_text())["step"] == 1


def test_fast_model_line_is_what_ddim_follows():
    """The coupled line passes through the noise at the first timestep, and one trailing v-prediction DDIM step from
    a perfect prediction lands exactly on it at the next timestep, ending on x0 itself -- for 1, 2 and 4 steps. With
    3, diffusers' trailing DDIM runs timesteps (999, 666, 332) but steps 666 to 666 - 1000 // 3 = 333: one timestep
    off the line, which costs under 1e-2 at the end (measured here, so a change in diffusers shows up)."""
    from diffusers import DDIMScheduler

    from latentlab.embedded import train_fast

    g = torch.Generator().manual_seed(0)
    noise, x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g,
                                                                                        dtype=torch.float64)
    for steps in (1, 2, 3, 4):
        sched = DDIMScheduler(**train_fast.scheduler_config())
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
        sched.set_timesteps(steps)
        assert int(sched.timesteps[0]) == train_fast.FIRST_T
        x = noise
        first, _ = train_fast.line(noise, x0, sched.timesteps[:1].repeat(3), sched.alphas_cumprod)
        assert torch.allclose(first, noise, atol=1e-12)
        for t in sched.timesteps:
            xt, v = train_fast.line(noise, x0, t.repeat(3), sched.alphas_cumprod)
            assert torch.allclose(x, xt, atol=1e-10 if steps != 3 else 1e-2)
            x = sched.step(v, t, x).prev_sample
        assert torch.allclose(x, x0, atol=1e-10 if steps != 3 else 1e-2)


@pytest.mark.slow
def test_fast_model_recipe_smoke_data_student_tiny_package_load(tmp_path):
    """A few steps of every stage of the few-step model's recipe; the teacher data are the default pipeline's own
    latents; the package loads as a plain StableDiffusionPipeline with a tiny decoder and generates in 2 steps."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from latentlab.embedded import model_path, train_fast

    out = tmp_path / "runs"
    train_fast.main(["data", "--out", str(out), "--steps", "1", "--shard-size", "4"])
    noise, x0, captions = train_fast.load_data(out)
    assert noise.shape == x0.shape == (4, 4, 8, 8) and len(captions) == 4
    ref = StableDiffusionPipeline.from_pretrained(model_path())
    ref.set_progress_bar_config(disable=True)
    same = ref(captions[:2], latents=noise[:2], num_inference_steps=20, guidance_scale=4.0,
               output_type="latent").images
    assert torch.equal(same, x0[:2])
    train_fast.main(["student", "--out", str(out), "--steps", "2", "--batch", "4"])
    train_fast.main(["tiny", "--out", str(out), "--steps", "2", "--pairs", "64", "--tiny-blocks", "1,1,1,1",
                     "--fg-weight", "4", "--encoder-share", "0.25"])
    train_fast.main(["package-preview", "--out", str(out), "--package-to", str(tmp_path / "preview")])
    from latentlab.backend import Lab

    lab = Lab.default().set_preview_decoder(tmp_path / "preview")
    assert tuple(lab.preview_decoder.config.num_decoder_blocks) == (1, 1, 1, 1)
    assert lab.generate_live(lab.noise(0), lab.encode_prompt("a red star"), num_inference_steps=2,
                             preview=True).shape == (1, 3, 64, 64)
    pkg = tmp_path / "model-fast"
    train_fast.main(["package", "--out", str(out), "--package-to", str(pkg)])
    pipe = DiffusionPipeline.from_pretrained(pkg)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star", num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and image.shape == (1, 3, 64, 64)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # v2's continuation: a new run starts from the packaged student (not the teacher) and over-samples small shapes
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    more = tmp_path / "runs2"
    shutil.copytree(out / "data", more / "data")
    train_fast.main(["student", "--out", str(more), "--steps", "0", "--start-from", str(pkg)])
    start = load_file(more / "student-ckpt" / "model.safetensors")
    packaged = UNet2DConditionModel.from_pretrained(pkg / "unet", dtype=torch.float32).state_dict()
    assert all(torch.equal(start[k], packaged[k]) for k in packaged)
    train_fast.main(["student", "--out", str(more), "--steps", "2", "--batch", "4", "--small-share", "1",
                     "--start-from", str(pkg)])
    assert json.loads((more / "student-ckpt" / "meta.json").read_text())["step"] == 2


def test_a_kill_at_any_moment_of_a_checkpoint_save_leaves_a_complete_checkpoint(tmp_path):
    """The three moments a kill can hit save_checkpoint: while writing the new folder (the old one stays), after the
    old one stepped aside (the finished new one is taken), after the swap (the old one is swept)."""
    import shutil

    from latentlab.embedded.train import load_checkpoint, save_checkpoint

    def state(v):
        m = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(m.weight, v)
        return m, torch.optim.AdamW(m.parameters())

    path = tmp_path / "unet-ckpt"
    m, opt = state(1.0)
    save_checkpoint(path, {"model": m}, opt, {"step": 1})
    m, opt = state(2.0)
    save_checkpoint(path, {"model": m}, opt, {"step": 2})
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    assert not tmp.exists() and not old.exists()

    def loaded():
        m, opt = state(0.0)
        meta = load_checkpoint(path, {"model": m}, opt)
        return meta["step"], float(m.weight[0, 0].detach())

    # 1. killed while writing step 3: a .tmp without meta.json beside the complete step 2
    shutil.copytree(path, tmp)
    (tmp / "meta.json").unlink()
    assert loaded() == (2, 2.0) and not tmp.exists()
    # 2. killed after step 2 stepped aside as .old, before the finished .tmp (step 3) took its name
    m, opt = state(3.0)
    save_checkpoint(tmp_path / "scratch", {"model": m}, opt, {"step": 3})
    os.replace(path, old)
    os.replace(tmp_path / "scratch", tmp)
    assert loaded() == (3, 3.0) and not tmp.exists() and not old.exists()
    # 3. killed before the finished .tmp was written: only .old is left
    os.replace(path, old)
    assert loaded() == (3, 3.0) and not old.exists()
    # 4. killed after the new folder was complete, before the old one stepped aside: the newer one wins
    m, opt = state(4.0)
    save_checkpoint(tmp_path / "scratch", {"model": m}, opt, {"step": 4})
    os.replace(tmp_path / "scratch", tmp)
    assert loaded() == (4, 4.0) and not tmp.exists()


_KILLED_TRAINING = """
import sys
from latentlab.embedded import train_flow
train_flow.main(["train", "--out", {out!r}, "--steps", "6", "--batch", "2", "--save-every", "0", "--threads", "1"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, draw", [("SIGKILL", 7), ("SIGTERM", 8), ("SIGINT", 9)])
def test_kill_9_at_a_random_point_of_a_training_run_resumes_to_the_same_weights(tmp_path, sig, draw):
    """SIGKILL (or SIGTERM, or Ctrl-C) the flow twin's recipe at a seeded random moment (mid-step or mid-save: it
    saves every step), then resume: the weights after 6 steps equal an uninterrupted run's bit for bit, and no
    .tmp/.old folder is left."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from latentlab.embedded import train_flow

    torch.set_num_threads(1)
    whole = tmp_path / "whole"
    train_flow.main(["train", "--out", str(whole), "--steps", "6", "--batch", "2", "--threads", "1"])
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINING.format(out=str(killed))],
                            stderr=subprocess.DEVNULL)
    rng = random.Random(draw)
    target = rng.randrange(1, 5)
    deadline = time.monotonic() + 300
    meta = killed / "flow-ckpt" / "meta.json"
    while proc.poll() is None and not (meta.exists() and json.loads(meta.read_text())["step"] >= target):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.5))
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(30) != 0  # stopped mid-run, not finished
    train_flow.main(["train", "--out", str(killed), "--steps", "6", "--batch", "2", "--threads", "1"])
    assert json.loads(meta.read_text())["step"] == 6
    for name in ("model", "ema"):
        a, b = load_file(whole / "flow-ckpt" / f"{name}.safetensors"), load_file(killed / "flow-ckpt" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in killed.iterdir()) == ["flow-ckpt"]


def test_the_tiny_decoders_loss_weights_the_shape_and_its_edge():
    from latentlab.embedded import world
    from latentlab.embedded.train_fast import foreground_weight

    b = world.sample(4, seed=3)
    x = b.images * 2 - 1
    w = foreground_weight(x, 4.0)
    assert w.shape == (4, 1, 64, 64) and torch.allclose(w.mean(dim=(2, 3)), torch.ones(4, 1))
    bg = x[:, :, :1, :1]
    on_shape = (x - bg).abs().amax(dim=1, keepdim=True) > 0.3
    assert on_shape.any(dim=(2, 3)).all()
    assert (w[on_shape].min() > w[~on_shape].min() * 4).item()  # shape pixels weigh 5x the far background
    assert torch.equal(foreground_weight(x, 0.0), torch.ones_like(w))
