"""The generative map (latentlab.atlas.AtlasMap): a click -> the image that lands there, verified by projection."""

import pytest
import torch
from fakes import FakeBackend, FakeCLIP
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlab.atlas import AtlasMap, build_atlas

PROMPTS = ["a red star", "a blue ring", "a green square", "a white cross", "a black circle"]


@pytest.fixture(scope="module")
def setup():
    lab = FakeBackend()
    atlas = build_atlas(lab, PROMPTS, [1, 2, 3, 4], clip=FakeCLIP(), progress=False)
    return lab, atlas


def _own_landing(m, lab, image, noise=None, latents=None):
    return m.transform(m.embed(noise, latents, image))[0]


def _click(m, u, v) -> list[float]:
    """The point at shares (u, v) of the map's bounding box."""
    lo, hi = m.coords_.min(0).values, m.coords_.max(0).values
    return (lo + (hi - lo) * torch.tensor([u, v])).tolist()


@settings(max_examples=12, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_the_search_lands_where_it_says_and_never_worse_than_the_blend(setup, u, v):
    lab, atlas = setup
    m = AtlasMap(atlas, space="image_embeds", clip=FakeCLIP())
    point = _click(m, u, v)
    image, landing = m.generate(lab, point, candidates=6, refine=1, slack=0.0)
    # the reported landing is the shown image's own embedding, projected with the same map
    torch.testing.assert_close(_own_landing(m, lab, image), torch.tensor(landing.landed), rtol=0, atol=1e-5)
    assert landing.error == pytest.approx(float((torch.tensor(landing.landed) - torch.tensor(point)).norm())
                                          / m.diagonal_, rel=1e-5)
    z, c, _ = m.blend_inputs(lab, point)
    blend_img = lab.decode(lab.generate(z, c, output_type="latent"))
    blend_err = float((_own_landing(m, lab, blend_img) - torch.tensor(point)).norm()) / m.diagonal_
    assert landing.error <= blend_err + 1e-6  # the blend is the first candidate: the pick is never worse
    images, landed = m.land(lab, z, c)  # the public "where does this land" agrees with doing it by hand
    torch.testing.assert_close(images, blend_img, rtol=0, atol=0)
    torch.testing.assert_close(landed[0], _own_landing(m, lab, blend_img), rtol=0, atol=1e-6)
    assert landing.nearest_item == pytest.approx(m.nearest_item_distance(point))
    assert landing.candidates >= 6 and landing.how["construction"]
    # with slack, a candidate landing a little further but more like the neighbourhood may be shown
    _, relaxed = m.generate(lab, point, candidates=6, refine=1, slack=0.05)
    assert relaxed.error <= landing.error + 0.05 + 1e-6


def test_a_click_on_an_item_reproduces_it_and_the_noise_map_moves_in_the_pca_plane(setup):
    lab, atlas = setup
    m = AtlasMap(atlas, space="latents", method="pca")
    _, landing = m.generate(lab, m.coords_[7].tolist(), candidates=3, refine=0)
    assert landing.error < 1e-5 and landing.nearest_item < 1e-6
    n = AtlasMap(atlas, space="noise", method="pca")
    point = (n.coords_[0] * 0.5 + n.coords_[9] * 0.5).tolist()
    _, landing = n.generate(lab, point, candidates=4, refine=0)
    assert "PCA plane" in landing.how["construction"] and landing.error < 0.02
    assert landing.beats_nearest_item


def test_generation_is_deterministic_and_records_how(setup):
    lab, atlas = setup
    m = AtlasMap(atlas, space="image_embeds", clip=FakeCLIP())
    a = m.generate(lab, (0.1, -0.2), candidates=8, refine=2, seed=3)
    b = m.generate(lab, (0.1, -0.2), candidates=8, refine=2, seed=3)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1] == b[1]
    how = a[1].how
    assert len(how["items"]) == len(how["prompt_weights"]) == len(how["seeds"]) == 8
    assert sum(how["prompt_weights"]) == pytest.approx(1, abs=1e-3)


def test_path_keyframes_are_mixes_along_the_stroke(setup):
    _lab, atlas = setup
    m = AtlasMap(atlas, space="latents")
    from latentlab.morph import Keyframe, Mix

    keys = [Keyframe(mix=Mix(**b)) for b in m.path_blends([m.coords_[0].tolist(), m.coords_[5].tolist()], 4, k=3)]
    assert len(keys) == 4 and all(k.mix is not None and len(k.mix.seeds) == 3 for k in keys)
    assert keys[0].mix.seed_weights[0] == 1.0 and keys[0].mix.seeds[0] == atlas.items[0]["seed"]
    with pytest.raises(ValueError, match="at least two points"):
        m.path_blends([(0.0, 0.0)])
    with pytest.raises(ValueError, match="no length"):
        m.path_blends([(0.0, 0.0), (0.0, 0.0)])


def test_bad_input_is_refused_by_name_before_any_generation(setup):
    lab, atlas = setup
    with pytest.raises(TypeError, match="`atlas` must be a latentlab.atlas.Atlas, got list"):
        AtlasMap([])
    with pytest.raises(ValueError, match="`space` must be one of"):
        AtlasMap(atlas, space="pixels")
    with pytest.raises(ValueError, match="`method` must be one of"):
        AtlasMap(atlas, method="tsne")
    m = AtlasMap(atlas, space="latents")
    before = len(lab.generated)
    for bad, err, match in [((1.0,), ValueError, "`point` must be two finite numbers"),
                            ((float("nan"), 0.0), ValueError, "`point` must be two finite numbers")]:
        with pytest.raises(err, match=match):
            m.generate(lab, bad)
    with pytest.raises(ValueError, match="`candidates` must be"):
        m.generate(lab, (0.0, 0.0), candidates=0)
    with pytest.raises(TypeError, match="`seed` must be an int"):
        m.generate(lab, (0.0, 0.0), seed=1.5)
    z, c, _ = m.blend_inputs(lab, (0.0, 0.0))
    for noise, cond, err, match in [(z.fill_(float("nan")), c, ValueError, "`noise` must be finite"),
                                    (z[0], c, ValueError, "`noise` must have at least 4"),
                                    ([1.0], c, TypeError, "`noise` must be a torch.Tensor"),
                                    (torch.zeros(1, 4, 8, 8), "a red star", TypeError, "`conditioning` must be")]:
        with pytest.raises(err, match=match):
            m.land(lab, noise, cond)
    assert len(lab.generated) == before


def test_faithful_path_keyframes_re_create_the_searched_images(setup):
    """With a backend, each keyframe is the searched candidate as a Mix: rendering the keyframe gives (up to the
    weights' rounding) the image the search picked."""
    from latentlab.morph import Keyframe, Mix, MorphSettings, plan

    lab, atlas = setup
    m = AtlasMap(atlas, space="image_embeds", clip=FakeCLIP())
    stroke = [m.coords_[0].tolist(), m.coords_[10].tolist()]
    keys = tuple(Keyframe(mix=Mix(**b)) for b in m.path_blends(stroke, 3, lab=lab, candidates=6, refine=1))
    assert len(keys) == 3 and all(k.mix is not None for k in keys)
    p = plan(lab, MorphSettings(keyframes=keys, n_frames=3))
    lat, cond = p.inputs(0, 3)
    images = lab.decode(lab.generate(lat, cond, output_type="latent"))
    mid = (torch.tensor(stroke[0]) + torch.tensor(stroke[1])) / 2
    searched, _ = m.generate(lab, mid.tolist(), candidates=6, refine=1)
    torch.testing.assert_close(images[1:2], searched, atol=1e-4, rtol=0)


def test_among_equally_good_landings_the_one_like_the_neighbourhood_is_shown(setup):
    _, atlas = setup
    m = AtlasMap(atlas, space="latents")
    pt = m.coords_[3]
    from latentlab.project import knn_weights

    idx, w = knn_weights(m.coords_, pt.tolist(), k=4)
    target = (w.float()[:, None] * atlas.latents[idx].flatten(1)).sum(0)
    vectors = torch.stack([target + 5, target + 0.1, target])
    err = torch.tensor([0.0, 0.005, 0.5]) * m.diagonal_
    assert m._pick(pt, idx, err, vectors, 0.01) == 1  # lands within slack and is most like the neighbourhood
    assert m._pick(pt, idx, err, vectors, 0.0) == 0  # no slack: the nearest landing
    assert m._pick(pt, idx, err, vectors, 1.0) == 2


def test_a_map_of_prompt_text_places_images_through_a_regression_to_the_text_side(setup):
    """A map of the prompts' CLIP text embeddings: a generated image lands where its image embedding, carried to the
    text side by the map's ridge regression and normalised, projects; that regression brings the atlas's own
    images nearer their prompts' embeddings than the plain modality-gap shift; the search still never does worse
    than the blend, and the landing reported is the shown image's own."""
    lab, atlas = setup
    clip = FakeCLIP()
    m = AtlasMap(atlas, space="prompt_embeds", clip=clip)
    n = torch.nn.functional.normalize
    mi, w, mt = m.to_text_
    img, txt = n(atlas.image_embeds.float(), dim=-1), n(atlas.prompt_embeds.float(), dim=-1)
    ridge = n((img - mi) @ w + mt, dim=-1)
    gap = n(img + txt.mean(0) - img.mean(0), dim=-1)
    assert (ridge - txt).norm(dim=1).mean() < (gap - txt).norm(dim=1).mean()
    point = (m.coords_[0] * 0.6 + m.coords_[5] * 0.4).tolist()
    image, landing = m.generate(lab, point, candidates=6, refine=1)
    own = n((clip.embed_images(image).float() - mi) @ w + mt, dim=-1)
    torch.testing.assert_close(m.transform(own)[0], torch.tensor(landing.landed), rtol=0, atol=1e-5)
    z, c, _ = m.blend_inputs(lab, point)
    _, blend_landed = m.land(lab, z, c)
    assert landing.error <= float((blend_landed[0] - torch.tensor(point)).norm()) / m.diagonal_ + 1e-6
    # the items of one prompt share its text point
    same = [i for i, it in enumerate(atlas.items) if it["prompt"] == atlas.items[0]["prompt"]]
    assert len(same) > 1 and torch.allclose(m.coords_[same], m.coords_[same[0]].expand(len(same), 2), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 4), st.integers(5, 9))
def test_refinement_takes_the_least_norm_fit_when_candidates_share_weights(seed, distinct, k):
    """Candidates repeat weight vectors (the same mix with other noise), so the linear model from weights to landing
    spots is rank-deficient. The refinement must resolve that the same way every time -- the least-norm fit, as
    numpy's SVD least squares gives it -- and its fitted step must land on the click under that model. (LAPACK's
    default rank-revealing QR judged the rank differently from call to call: a map that was flaky in CI.)"""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    base = torch.rand(distinct, k, generator=g, dtype=torch.float64) + 0.05
    base = base / base.sum(1, keepdim=True)
    rows = [base[i % distinct] for i in range(2 * distinct + 1)]  # each weight vector more than once
    cands = [(w, 0, "c") for w in rows]
    landed = torch.randn(len(rows), 2, generator=g, dtype=torch.float64)
    pt = landed.mean(0).float() + 0.01
    out = AtlasMap._refined(None, pt, cands, {"landed": landed})
    W = torch.stack(rows)
    A = torch.from_numpy(np.linalg.lstsq(W.numpy(), landed.numpy(), rcond=None)[0])
    best = int((landed - pt.double()).norm(dim=1).argmin())
    C = np.vstack([A.T.numpy(), np.ones((1, k))])
    step = np.linalg.lstsq(C, np.concatenate([pt.double().numpy(), [1.0]]) - C @ W[best].numpy(), rcond=None)[0]
    w = (W[best] + torch.from_numpy(step)).clamp_min(0)
    torch.testing.assert_close(out[0][0], w / w.sum(), rtol=0, atol=1e-9)
    assert out[0][2] == "fitted, best noise" and out[1][2] == "fitted, blended noise"
    again = AtlasMap._refined(None, pt, cands, {"landed": landed})
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again, strict=True))


@settings(max_examples=8, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1))
def test_further_rounds_run_only_while_the_click_loses_to_the_nearest_item(setup, u, v):
    lab, atlas = setup
    m = AtlasMap(atlas, space="image_embeds", clip=FakeCLIP())
    point = _click(m, u, v)
    _, plain = m.generate(lab, point, candidates=6, refine=1, more=0)
    _, more = m.generate(lab, point, candidates=6, refine=1, more=2)
    assert more.error <= plain.error + 1e-9  # the same candidates first, then more: the nearest can only be nearer
    if plain.beats_nearest_item:
        assert more.candidates == plain.candidates and more.error == plain.error
    else:
        assert more.candidates > plain.candidates
    _, none = m.generate(lab, point, candidates=6, refine=0, more=2)
    assert none.candidates == 6  # refine=0: no rounds at all
