"""Latents and embeddings saved with provenance in safetensors; never unpickled."""

from __future__ import annotations

import pickle

import pytest
import torch

from latentlab import store


def test_round_trip_with_provenance(tmp_path):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    e = torch.randn(2, 77, 64)
    path = store.save(tmp_path / "a.safetensors", {"latents": z, "prompt_embeds": e},
                      provenance={"seed": [1, 2], "prompt": ["a", "b"], "model": "m", "num_inference_steps": 20})
    tensors, prov = store.load(path)
    assert torch.equal(tensors["latents"], z) and tensors["latents"].dtype == torch.float16
    assert torch.equal(tensors["prompt_embeds"], e)
    assert prov["seed"] == [1, 2] and prov["num_inference_steps"] == 20
    assert {"latentlab", "torch", "diffusers", "transformers"} <= set(prov["versions"])


def test_refuses_overwrite_pickles_and_bad_input(tmp_path):
    path = store.save(tmp_path / "a.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        store.save(path, {"x": torch.ones(1)})
    store.save(path, {"x": torch.ones(1)}, overwrite=True)
    assert store.load(path)[0]["x"].item() == 1.0
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": torch.zeros(1)}))
    with pytest.raises(Exception) as info:  # safetensors refuses to parse it; nothing is unpickled
        store.load(evil)
    assert "pickle" not in type(info.value).__module__
    with pytest.raises(ValueError, match=r"`path` must end in .safetensors, got 'a.pt'"):
        store.save(tmp_path / "a.pt", {"x": torch.zeros(1)})
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        store.save(tmp_path / "b.safetensors", {"x": torch.zeros(1)}, provenance={"f": object()})
    with pytest.raises(FileNotFoundError):
        store.load(tmp_path / "missing.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "evil.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_users_umask_permissions(tmp_path, mask):
    """safetensors writes 0600; latentlab's files get what the user's umask says, like any other program's."""
    import os

    from latentlab import exports, store
    from latentlab._files import atomic_write_text

    old = os.umask(mask)
    try:
        paths = [store.save(tmp_path / "a.safetensors", {"x": torch.zeros(2)}),
                 exports.save_direction(torch.zeros(3), tmp_path / "d.npy"),
                 atomic_write_text(tmp_path / "m.json", "{}")]
    finally:
        os.umask(old)
    for p in paths:
        assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~mask), p.name
