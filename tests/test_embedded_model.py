"""The shipped embedded model: standard diffusers folder, small, safetensors only, and it does what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentlab import Lab, embedded
from latentlab.embedded import evaluate, world


def _pickles(files) -> list:
    """The files among ``files`` stored in a pickle-based format (a model folder ships safetensors only)."""
    return [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_shipped_folder_is_plain_diffusers_small_and_safetensors_only():
    from diffusers import StableDiffusionPipeline

    path = embedded.model_path()
    files = [p for p in path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1000**2
    assert not _pickles(files)
    pipe = StableDiffusionPipeline.from_pretrained(path)  # no latentlab code involved
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a large red circle on a blue background", num_inference_steps=8, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_default_lab_follows_prompts_on_held_out_combinations():
    lab = Lab.default()
    assert lab.latent_shape() == (4, 8, 8) and lab.default_size() == (64, 64)
    prompts = world.held_out_prompts()[::16]  # 16 combinations never seen in training
    images = lab.generate(lab.noise(list(range(len(prompts)))),
                          lab.encode_prompt([world.caption(*p) for p in prompts]))
    bgs, fgs, _ = evaluate.segment(images)
    bg_acc = sum(b == p[3] for b, p in zip(bgs, prompts)) / len(prompts)
    fg_acc = sum(f == p[1] for f, p in zip(fgs, prompts)) / len(prompts)
    assert bg_acc >= 0.8 and fg_acc >= 0.7, (bg_acc, fg_acc)


def test_embedded_clip_reads_colours():
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(embedded.clip_path(), dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(embedded.model_path() / "tokenizer")
    scores = evaluate.clip_zero_shot(clip, tok, n=64)
    assert scores["colour"] >= 0.9 and scores["background"] >= 0.9, scores


@pytest.mark.slow
def test_the_readme_demo_starts_and_ends_on_what_its_prompts_say():
    """The README's main job morphs "a large red circle on a blue background" to "a small yellow star on a black
    background" (seed 0): its first and last frames are read by the evaluator as exactly those attributes."""
    from latentlab.morph import Keyframe, MorphSettings, plan

    lab = Lab.default()
    s = MorphSettings(keyframes=(Keyframe("a large red circle on a blue background"),
                                 Keyframe("a small yellow star on a black background")), n_frames=48)
    p = plan(lab, s)
    lat, cond = p.inputs(0, 48)
    images = lab.generate(lat[[0, 47]], cond[[0, 47]])
    got = evaluate.attributes(images, evaluate.shape_classifier())  # the evaluator the model card uses
    assert got[0] == {"background": "blue", "colour": "red", "shape": "circle", "size": "large"}, got[0]
    assert got[1] == {"background": "black", "colour": "yellow", "shape": "star", "size": "small"}, got[1]


def test_the_shipped_shape_reader_is_the_evaluators():
    """The evaluator's shape classifier ships with the package (notebooks and tests load it in milliseconds); it
    reads fresh renders as well as a freshly trained one (measured: 99.4 % on 512 held-out renders)."""
    from latentlab.embedded import evaluate

    assert evaluate.SHAPE_CLASSIFIER.is_file()
    net = evaluate.shape_classifier()
    masks, labels = evaluate._masks_and_labels(512, seed=999_999)
    with torch.no_grad():
        acc = (net(masks).argmax(1) == labels).float().mean().item()
    assert acc >= 0.98


@pytest.mark.slow
def test_the_flow_twin_is_a_plain_sd3_folder_that_follows_prompts():
    """'embedded-shapes-flow': a StableDiffusion3Pipeline folder (<= 40 MB, safetensors only) that a plain
    DiffusionPipeline.from_pretrained loads and generates from; on the same VAE as the default model."""
    from diffusers import DiffusionPipeline

    path = embedded.model_path("embedded-shapes-flow")
    files = [p for p in path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1000**2
    assert not _pickles(files)
    pipe = DiffusionPipeline.from_pretrained(path)  # no latentlab code involved
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    prompts = world.held_out_prompts()[::32]  # 8 combinations never seen in training
    out = pipe([world.caption(*p) for p in prompts], num_inference_steps=20, guidance_scale=4.0, output_type="pt",
               generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    assert out.shape == (len(prompts), 3, 64, 64)
    bgs, _, _ = evaluate.segment(out)
    assert sum(b == p[3] for b, p in zip(bgs, prompts)) / len(prompts) >= 0.75
    flow = Lab.default("embedded-shapes-flow")
    assert flow.family == "sd3" and flow.model_id == "latentlab/embedded-shapes-flow"
    assert flow.latent_shape() == Lab.default().latent_shape() == (4, 8, 8)
    assert torch.equal(flow.pipe.vae.state_dict()["decoder.conv_out.weight"],
                       Lab.default().pipe.vae.state_dict()["decoder.conv_out.weight"])  # the same VAE


def test_the_few_step_model_shares_the_default_models_text_encoder_and_vae():
    """The widgets draw previews with the few-step model from the *default* model's conditioning and latents
    (``widgets._base.preview_lab``), so the two folders must hold the same text encoder and VAE, bit for bit: a new
    default model ships with the few-step model's copies replaced."""
    from safetensors.torch import load_file

    if not embedded.is_available("embedded-shapes-fast"):
        pytest.skip("the few-step model is not installed")
    full, fast = embedded.model_path(), embedded.model_path("embedded-shapes-fast")
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(full / part), load_file(fast / part)
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part} differs between the default and few-step models"


def test_the_kept_training_candidate_is_a_plain_safetensors_pipeline_that_unpacks(tmp_path):
    """data/candidates/ keeps a model a training session made and did not ship (runs/ does not outlive a session):
    plain diffusers, safetensors only, and `train.py unpack` turns it into checkpoints the next session resumes."""
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from latentlab.embedded import train

    root = Path(__file__).parent.parent / "data" / "candidates"
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        pytest.skip("no training candidate is kept")
    for path in folders:
        files = [p for p in path.rglob("*") if p.is_file()]
        assert not _pickles(files)
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a large red circle on a blue background", num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
        train.main(["unpack", "--out", str(tmp_path / path.name), "--package-to", str(path), "--decoder-step", "5"])
        assert {p.name for p in (tmp_path / path.name).iterdir()} >= {"unet-ckpt", "vae-ckpt", "decoder-ckpt", "clip-ckpt"}


def test_the_cards_inbetween_measure_runs_the_default_morphs_attention_path():
    """The card's clean-in-between measure reads the morph's default prompt path too (AttentionMix on the UNet
    model): its morph starts and ends on the same frames as the prompt-lerp morph (weights not reversed), and an
    unknown path is refused by name."""
    lab = Lab.default()
    a, b = world.held_out_prompts()[0], world.held_out_prompts()[7]
    ts = torch.tensor([0.0, 0.5, 1.0])
    lat, lerped = evaluate._morph_inputs(lab, a, b, 0, ts)
    lat2, mixed = evaluate._morph_inputs(lab, a, b, 0, ts, "attention")
    assert torch.equal(lat, lat2) and type(mixed).__name__ == "AttentionMix"
    x, y = lab.generate(lat, lerped), lab.generate(lat, mixed)
    assert (x[[0, 2]] - y[[0, 2]]).abs().max() < 1e-3
    assert (x[1] - y[1]).abs().max() > 1e-3  # the in-between differs: a real mix, not one of the prompts
    out = evaluate.clean_inbetweens(lab, evaluate.shape_classifier(), pairs=1, frames=3, prompt_path="attention")
    assert out["frames"] == 3 and 0 <= out["one_clean_shape"] <= 1
    with pytest.raises(ValueError, match="prompt_path"):
        evaluate.clean_inbetweens(lab, evaluate.shape_classifier(), pairs=1, frames=3, prompt_path="slerp")


def test_every_shipped_embedded_file_is_package_data():
    """A non-editable ``pip install .`` ships only what ``[tool.setuptools.package-data]`` names: every file of the
    embedded models (and their preview decoder, card and evaluator) must match one of its patterns."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["latentlab"]
    shipped = [p for p in (root / "latentlab" / "embedded").rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert shipped
    missing = [str(p.relative_to(root / "latentlab")) for p in shipped
               if not any(fnmatch.fnmatch(str(p.relative_to(root / "latentlab")), pat.replace("**/", "*"))
                          or fnmatch.fnmatch(str(p.relative_to(root / "latentlab")), pat) for pat in patterns)]
    assert not missing, missing
