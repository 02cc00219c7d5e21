"""Sharded atlases: the same items as one in-memory atlas, read lazily, resumed, refused when foreign, and built by
two real processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fakes import FakeBackend, FakeCLIP

from latentlab import store
from latentlab.atlas import ShardedAtlas, build_atlas, build_atlas_shards
from latentlab.atlas.core import COLUMNS
from latentlab.project import PCA

PROMPTS = ["a red star", "a blue ring", "a green cross"]
SEEDS = list(range(7))  # 21 items: shards of 5 -> 5 shards, the last of 1 item


def _build(folder, lab=None, **kw):
    return build_atlas_shards(lab or FakeBackend(), PROMPTS, SEEDS, folder, shard_size=5, clip=FakeCLIP(),
                              attributes={"a red star": {"colour": "red"}}, progress=False, **kw)


def test_shards_hold_the_same_items_as_one_atlas_and_read_lazily(tmp_path, monkeypatch):
    whole = build_atlas(FakeBackend(), PROMPTS, SEEDS, clip=FakeCLIP(), attributes={"a red star": {"colour": "red"}},
                        progress=False)
    sharded = _build(tmp_path / "a")
    assert len(sharded) == 21 and sharded.n_shards == 5
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["index.json"] + [
        f"shard-{k:06d}.safetensors" for k in range(5)]
    again = sharded.to_atlas()
    for c in COLUMNS:
        torch.testing.assert_close(getattr(again, c), getattr(whole, c), rtol=0, atol=0)
    assert again.items == whole.items and sharded.items(slice(4, 6)) == whole.items[4:6]
    # A slice across a shard boundary reads only the two shards it touches, and only the one column.
    reads = []
    original = store.load
    monkeypatch.setattr(store, "load", lambda path, **kw: reads.append((Path(path).name, kw["keys"])) or original(
        path, **kw))
    opened = ShardedAtlas(tmp_path / "a")
    assert reads == []  # opening reads the index only
    torch.testing.assert_close(opened.column("latents", slice(3, 7)), whole.latents[3:7], rtol=0, atol=0)
    assert reads == [("shard-000000.safetensors", ["latents"]), ("shard-000001.safetensors", ["latents"])]
    idx = torch.tensor([20, 0, 11, 3])
    torch.testing.assert_close(opened.rows("noise", idx), whole.noise[idx], rtol=0, atol=0)
    chunks = list(opened.chunks("image_embeds", size=8))
    assert [s for s, _ in chunks] == [0, 8, 16] and sum(len(t) for _, t in chunks) == 21
    # Projection: fitted on a sample, applied chunk by chunk; with the whole set as the sample it equals PCA.
    coords = opened.project(PCA(2), "latents", sample=21, size=4)
    torch.testing.assert_close(coords, PCA(2).fit(whole.latents.flatten(1)).transform(whole.latents.flatten(1)))
    assert opened.project(PCA(2), "latents", sample=10, size=4).shape == (21, 2)
    with pytest.raises(ValueError, match=r"`name` must be one of"):
        opened.column("pixels")
    with pytest.raises(ValueError, match=r"contiguous slice, got step 2"):
        opened.column("noise", slice(0, 10, 2))


def test_a_killed_build_resumes_damaged_shards_are_redone_and_foreign_folders_refused(tmp_path):
    folder = tmp_path / "a"
    _build(folder)
    (folder / "shard-000002.safetensors").unlink()
    (folder / "shard-000004.safetensors").write_bytes(b"truncated")
    lab = FakeBackend()
    _build(folder, lab)
    assert lab.generated == [5, 1]  # only shard 2 (5 items) and the damaged shard 4 (1 item) again
    assert len(ShardedAtlas(folder).to_atlas()) == 21
    with pytest.raises(FileExistsError, match=r"holds another atlas"):
        build_atlas_shards(FakeBackend(), ["a purple ring"], SEEDS, folder, shard_size=5, clip=FakeCLIP(),
                           progress=False)
    with pytest.raises(FileNotFoundError, match=r"is not a sharded atlas \(no index.json\)"):
        ShardedAtlas(tmp_path)


def _rank_build(folder: str, log: str) -> None:
    from latentlab.distributed import ranks

    lab = FakeBackend()
    _build(Path(folder), lab)
    r = ranks()
    Path(log, f"rank{r.rank}.json").write_text(json.dumps({"world": r.world_size, "items": sum(lab.generated)}))


def test_two_processes_build_disjoint_shards_of_the_same_atlas(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    one = _build(tmp_path / "one").to_atlas()
    logs = tmp_path / "logs"
    logs.mkdir()
    accelerate.debug_launcher(_rank_build, args=(str(tmp_path / "two"), str(logs)), num_processes=2)
    ranks = [json.loads((logs / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["items"] for r in ranks] == [5 + 5 + 1, 5 + 5]  # shards 0, 2, 4 and 1, 3: no item twice
    two = ShardedAtlas(tmp_path / "two")
    assert two.index["world_size"] == 2
    assert [two.shard(k).provenance["rank"] for k in range(5)] == [0, 1, 0, 1, 0]
    for c in COLUMNS:
        torch.testing.assert_close(getattr(two.to_atlas(), c), getattr(one, c), rtol=0, atol=0)


_KILLED_BUILD = """
import sys, time
sys.path.insert(0, {tests!r})
from fakes import FakeBackend, FakeCLIP
from latentlab.atlas import build_atlas_shards
lab = FakeBackend()
generate = lab.generate
def slow(*a, **k):
    time.sleep(0.05)
    return generate(*a, **k)
lab.generate = slow
print("started", flush=True)
build_atlas_shards(lab, {prompts!r}, {seeds!r}, {folder!r}, shard_size=2, clip=FakeCLIP(), progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, draw", [("SIGKILL", 0), ("SIGKILL", 1), ("SIGKILL", 2), ("SIGTERM", 3), ("SIGINT", 4)])
def test_kill_9_at_a_random_point_of_a_build_resumes_to_the_same_atlas_with_no_temp_file_left(tmp_path, sig, draw):
    """SIGKILL (or SIGTERM, or Ctrl-C) a sharded build at a seeded random moment (mid-shard, mid-save or between
    shards), then resume in this process: the same atlas bit for bit as an uninterrupted build, no process left, no
    partial file left."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(1000 + draw)
    whole = build_atlas_shards(FakeBackend(), PROMPTS, SEEDS, tmp_path / "whole", shard_size=2, clip=FakeCLIP(),
                               progress=False).to_atlas()
    folder = tmp_path / "killed"
    code = _KILLED_BUILD.format(tests=str(Path(__file__).parent), prompts=PROMPTS, seeds=SEEDS, folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "started"
    target = rng.randrange(0, 10)  # kill once this many shards exist, after a random part of the next one
    deadline = time.monotonic() + 120
    while len(list(folder.glob("shard-*.safetensors"))) < target and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.12))
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(30) != 0  # stopped mid-build, not finished
    assert len(list(folder.glob("shard-*.safetensors"))) < 11 and not (folder / "index.json").exists()
    resumed = build_atlas_shards(FakeBackend(), PROMPTS, SEEDS, folder, shard_size=2, clip=FakeCLIP(),
                                 progress=False).to_atlas()
    for c in ("noise", "latents", "image_embeds", "prompt_embeds", "thumbnails"):
        torch.testing.assert_close(getattr(resumed, c), getattr(whole, c), rtol=0, atol=0)
    assert resumed.items == whole.items
    assert not [p.name for p in folder.iterdir() if ".partial" in p.name]


def test_a_dead_writers_partial_file_is_removed_and_a_live_ones_kept(tmp_path):
    import os

    from latentlab._files import remove_stale_partials

    target = tmp_path / "shard-000001.safetensors"
    dead = tmp_path / ".shard-000001.999999999.partial.safetensors"  # no such pid
    live = tmp_path / f".shard-000001.{os.getppid()}.partial.safetensors"
    other = tmp_path / ".shard-000002.999999999.partial.safetensors"
    for p in (dead, live, other):
        p.write_bytes(b"half")
    assert remove_stale_partials(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
