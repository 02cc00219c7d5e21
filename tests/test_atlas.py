"""The atlas on the embedded shapes world: how much known structure projections recover; directions that work."""

from __future__ import annotations

import random

import pytest
import torch

from latentlab.atlas import Atlas, apply_direction, build_atlas, plot_atlas, prompt_direction
from latentlab.embedded import world
from latentlab.project import PCA, UMAP, knn_accuracy, trustworthiness


@pytest.fixture(scope="module")
def lab():
    from latentlab import Lab

    return Lab.default()


@pytest.fixture(scope="module")
def atlas(lab):
    prompts = random.Random(0).sample(world.held_out_prompts(), 64)
    attrs = {world.caption(*p): world.attributes(p) for p in prompts}
    return build_atlas(lab, list(attrs), [1, 2], attributes=attrs, progress=False)


@pytest.mark.slow
def test_projections_recover_the_worlds_structure(atlas):
    """Thresholds (measured on 192 items: 100 %, 80 %, 0.99, <= 15 %) sit well above chance and below what was
    measured, so the test fails if the atlas, the projections or the model lose their structure:

    - final latents, PCA to 2-D: the background fills most of the image, so it is the main axis of variation;
      k-NN background accuracy >= 90 % (chance 12.5 %).
    - CLIP image embeddings, UMAP to 2-D: colour clusters, k-NN >= 60 % (chance 14 %), trustworthiness >= 0.9.
    - control: the initial noise carries no attribute, k-NN <= 30 % for colour/background/shape.
    """
    lat = PCA(2).fit_transform(atlas.latents)
    assert knn_accuracy(lat, atlas.labels("background")) >= 0.9
    clip = atlas.image_embeds
    emb = UMAP(n_neighbors=15, random_state=0).fit_transform(clip)
    assert knn_accuracy(emb, atlas.labels("colour")) >= 0.6
    assert trustworthiness(clip, emb) >= 0.9
    noise2 = PCA(2).fit_transform(atlas.noise)
    for key in ("colour", "background", "shape"):
        assert knn_accuracy(noise2, atlas.labels(key)) <= 0.3, key


@pytest.mark.slow
def test_atlas_round_trips_and_plots(atlas, tmp_path):
    path = atlas.save(tmp_path / "atlas.safetensors")
    again = Atlas.load(path)
    assert torch.equal(again.latents, atlas.latents) and again.items == atlas.items
    assert again.provenance["model"] == "latentlab/embedded-shapes"
    with pytest.raises(FileExistsError):
        atlas.save(path)
    fig = plot_atlas(atlas, PCA(2).fit_transform(atlas.image_embeds), color_by="colour")
    fig.savefig(tmp_path / "atlas.png")
    assert (tmp_path / "atlas.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"`coords` must have shape \(128, 2\)"):
        plot_atlas(atlas, torch.zeros(3, 2))
    with pytest.raises(KeyError, match="items have no 'mood'"):
        atlas.labels("mood")


@pytest.mark.slow
def test_a_prompt_direction_changes_the_attribute_it_names(lab):
    """Moving "a large red star on a blue background" along (green - red) makes green stars: read by the evaluator."""
    from latentlab.embedded.evaluate import segment

    base = lab.encode_prompt("a large red star on a blue background")
    d = prompt_direction(lab, "a large green star on a blue background", "a large red star on a blue background")
    cond = apply_direction(base, d, [0.0, 1.0])
    z = lab.noise([11, 11])
    _, colours, _ = segment(lab.generate(z, cond))
    assert colours == ["red", "green"]
