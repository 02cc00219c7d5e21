"""The synthetic world's morph reader (clean in-betweens, monotonic change, endpoints) on rendered frames, where
the truth is known, and the held-out pair draw."""

import torch

from latentlab.embedded import evaluate, world

A = ("large", "red", "circle", "blue")
B = ("large", "red", "square", "blue")


def _frames(prompts, seed=3):
    return world.render_prompts(prompts, seed=seed).images


def test_a_cut_between_two_clean_images_reads_clean_and_monotonic():
    # Same seed per frame: the same position and rotation, like a morph at a fixed seed.
    frames = torch.cat([_frames([A]) for _ in range(4)] + [_frames([B]) for _ in range(5)])
    r = evaluate.read_morph(frames, A, B, evaluate.shape_classifier())
    assert r["clean"] == [True] * 7
    assert all(r["monotonic"].values()) and r["endpoints"] == [True, True]


def test_a_third_shape_a_return_and_a_second_blob_are_caught():
    net = evaluate.shape_classifier()
    third = ("large", "red", "star", "blue")
    frames = torch.cat([_frames([A]), _frames([third]), _frames([B]), _frames([A]), _frames([B])])
    r = evaluate.read_morph(frames, A, B, net)
    assert r["clean"] == [False, True, True]
    assert r["monotonic"]["shape"] is False and r["monotonic"]["colour"] is True
    two = _frames([A], seed=1).clone()
    blue = torch.tensor(world.COLOURS["blue"]).view(3, 1, 1)
    corners = [(0, 0), (0, 46), (46, 0), (46, 46)]
    y, x = next((y, x) for y, x in corners if bool(((two[0, :, y:y + 18, x:x + 18] - blue).abs() < 0.05).all()))
    two[0, :, y + 1:y + 17, x + 1:x + 17] = torch.tensor(world.COLOURS["red"]).view(3, 1, 1)  # a 2nd blob, 16x16 px
    r = evaluate.read_morph(torch.cat([_frames([A], seed=1), two, _frames([A], seed=1)]), A, A, net)
    assert r["clean"] == [False]
    wrong_end = evaluate.read_morph(torch.cat([_frames([A]), _frames([A]), _frames([A])]), A, B, net)
    assert wrong_end["endpoints"] == [True, False] and wrong_end["monotonic"]["shape"] is True


def test_one_attribute_pairs_differ_in_exactly_the_named_attribute_in_turn():
    pairs = evaluate.one_attribute_pairs(40, seed=5)
    assert pairs == evaluate.one_attribute_pairs(40, seed=5) and pairs != evaluate.one_attribute_pairs(40, seed=6)
    held, valid = set(world.held_out_prompts()), set(world.all_prompts())
    slot = {"size": 0, "colour": 1, "shape": 2, "background": 3}
    for k, (a, b, attr) in enumerate(pairs):
        assert attr == ("background", "colour", "shape", "size")[k % 4]
        assert a in held and b in valid
        assert [i for i in range(4) if a[i] != b[i]] == [slot[attr]]
