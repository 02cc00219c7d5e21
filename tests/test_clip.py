"""CLIP embeddings: the embedded CLIP, preprocessing, and agreement with transformers' own pipeline."""

from __future__ import annotations

import pytest
import torch

from latentlab.clip import CLIP
from latentlab.embedded import world


@pytest.fixture(scope="module")
def clip():
    return CLIP.default()


def test_embeddings_are_unit_vectors_and_batch_independent(clip):
    images = world.sample(6, seed=1).images
    e = clip.embed_images(images)
    assert e.shape == (6, clip.dim) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(clip.embed_images(images, batch_size=2), e, rtol=0, atol=1e-5)
    t = clip.embed_text(["a red star", "a blue ring"])
    torch.testing.assert_close(t.norm(dim=1), torch.ones(2))


def test_zero_shot_reads_colours_of_held_out_images(clip):
    b = world.sample(32, seed=7, prompts=world.held_out_prompts())
    # A colour word alone is an unusual caption for this CLIP: score full captions that differ only in colour.
    hits = 0
    for img, a in zip(b.images, b.attributes):
        caps = [world.caption(a["size"], c, a["shape"], a["background"]) for c in world.COLOUR_NAMES
                if c != a["background"]]
        p = clip.zero_shot(img[None], caps)
        hits += caps[int(p.argmax())] == world.caption(a["size"], a["colour"], a["shape"], a["background"])
    assert hits / len(b.images) >= 0.9


def test_preprocess_matches_model_input_and_resizes(clip):
    x = world.sample(2, seed=3).images
    torch.testing.assert_close(clip.preprocess(x), (x - 0.5) / 0.5)  # embedded CLIP: 64x64, mean = std = 0.5
    big = torch.nn.functional.interpolate(x, size=(128, 160), mode="bilinear")
    assert clip.preprocess(big).shape == (2, 3, 64, 64)
    # Upscaled images embed close to the originals (centre crop of a wider image loses its sides: compare squares).
    square = torch.nn.functional.interpolate(x, size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    assert (clip.embed_images(square) * clip.embed_images(x)).sum(1).min() > 0.9
    with pytest.raises(ValueError, match=r"`images` must have 3 channels"):
        clip.embed_images(torch.rand(1, 1, 64, 64))
    with pytest.raises(TypeError, match=r"`prompt` must be a string or a non-empty list of strings"):
        clip.embed_text([])


def test_any_transformers_clip_checkpoint_loads(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from latentlab import embedded

    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path / "c")
    c = CLIP.from_pretrained(tmp_path / "c", tokenizer=embedded.model_path() / "tokenizer", device="cpu")
    assert c.dim == 8 and c.image_size == 32
    torch.testing.assert_close(c.image_mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    assert c.embed_images(torch.rand(3, 3, 64, 48)).shape == (3, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIP.from_pretrained(tmp_path / "missing")


def test_a_clip_folder_is_checked_whole_before_loading(tmp_path):
    """What can be known without loading: the folder, a CLIP config, safetensors weights, a tokenizer -- each missing
    piece named, before transformers is asked (whose messages name neither the argument nor the missing file)."""
    import json
    import shutil

    from latentlab import embedded
    from latentlab.clip import check_clip_folder

    good = embedded.model_path() / "clip"
    assert check_clip_folder(good, tokenizer=False) == good
    folder = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="`model_id_or_path` does not exist"):
        CLIP.from_pretrained(folder)
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a CLIP folder \(no config.json\)"):
        CLIP.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CLIP.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="is not a CLIP model: .* model_type 'siglip'"):
        CLIP.from_pretrained(folder)
    shutil.copy(good / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(FileNotFoundError, match="has no safetensors weights .* never pickled"):
        CLIP.from_pretrained(folder)
    shutil.copy(good / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        CLIP.from_pretrained(folder)
    tok = embedded.model_path() / "tokenizer"
    assert CLIP.from_pretrained(folder, tokenizer=tok).dim == CLIP.default().dim  # a separate tokenizer is fine
