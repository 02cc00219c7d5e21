"""Distributed renders: two real CPU processes (gloo, via accelerate's launchers) render one morph; the result equals
the one-process render, no frame is rendered twice, and a failed distributed render resumes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeBackend
from helpers import free_port

from latentlab.distributed import Ranks, launched, ranks, shutdown
from latentlab.morph import Keyframe, MorphSettings, cache_dir, manifest_path, render_morph
from latentlab.video import read_video

accelerate = pytest.importorskip("accelerate")


def _settings(n: int = 22) -> MorphSettings:
    return MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2)), n_frames=n)


def _rank_render(out: str, log_dir: str, fail_on_rank: int, n: int, write: str = "ok") -> None:
    """Run in each launched process: render, and record who this process was, what it rendered and when it returned.
    ``write``: rank 0's manifest write is "ok", "slow" (half a second first) or "fails" (an OSError)."""
    import latentlab.morph.render as render_module

    r = ranks()
    if r.is_main and write != "ok":
        original_write = render_module.write_manifest

        def writing(path, data):
            time.sleep(0.5)
            if write == "fails":
                raise OSError("simulated disk failure")
            original_write(path, data)

        render_module.write_manifest = writing
    fake = FakeBackend(compute_batch=4)
    rendered: list[str] = []
    original = fake.generate

    def recording(latents, conditioning, **kw):
        if r.rank == fail_on_rank and len(rendered) >= 4:
            raise RuntimeError("simulated crash")
        rendered.extend(hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in latents)
        return original(latents, conditioning, **kw)

    fake.generate = recording
    error = None
    try:
        render_morph(fake, _settings(n), out, progress=False, keep_cache=True)
    except (RuntimeError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    Path(log_dir, f"rank{r.rank}.json").write_text(json.dumps(
        {"rank": r.rank, "world_size": r.world_size, "pid": os.getpid(), "rendered": rendered, "error": error,
         "returned": time.time()}))


def _launch(tmp_path: Path, name: str, *, fail_on_rank: int = -1, n: int = 22, write: str = "ok") -> list[dict]:
    logs = tmp_path / f"logs-{len(list(tmp_path.glob('logs-*')))}"
    logs.mkdir()
    accelerate.debug_launcher(_rank_render, args=(str(tmp_path / name), str(logs), fail_on_rank, n, write),
                              num_processes=2)
    return [json.loads((logs / f"rank{i}.json").read_text()) for i in range(2)]


def test_one_process_is_rank_0_of_1_without_importing_accelerate():
    code = ("import sys; from latentlab.distributed import ranks, launched; r = ranks(); "
            "print(r.rank, r.world_size, launched(), 'accelerate' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["0", "1", "False", "False"]
    assert not launched() and ranks() == Ranks(0, 1)


def test_shutdown_leaves_the_process_group_and_is_safe_twice(tmp_path):
    """A launched process leaves its group at exit (registered by ranks()): a rank that finished first and exited
    with gloo's group alive could abort in its teardown and fail the launch. shutdown() is a no-op without a group."""
    import torch.distributed as dist

    shutdown()  # no group yet: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown()
    assert not dist.is_initialized()
    shutdown()


def test_shares_partition_the_frames_in_whole_blocks():
    for world in (1, 2, 3, 5):
        for n in (0, 1, 7, 22, 64):
            shares = [Ranks(r, world).share(n, block=4) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            for s in shares:  # whole blocks: every block a rank starts, it finishes (but the last)
                for start in s[::4]:
                    assert start % 4 == 0 and s[s.index(start) : s.index(start) + 4] == list(
                        range(start, min(n, start + 4)))
    with pytest.raises(ValueError, match="`block` must be >= 1, got 0"):
        Ranks().share(3, block=0)


def test_two_process_render_equals_one_process_and_renders_no_frame_twice(tmp_path):
    single = render_morph(FakeBackend(compute_batch=4), _settings(), tmp_path / "single.gif", progress=False)
    logs = _launch(tmp_path, "dist.gif")
    assert [log["rank"] for log in logs] == [0, 1] and {log["world_size"] for log in logs} == {2}
    assert logs[0]["pid"] != logs[1]["pid"]  # really two processes
    assert all(log["error"] is None for log in logs)
    a, b = set(logs[0]["rendered"]), set(logs[1]["rendered"])
    assert len(a) == len(logs[0]["rendered"]) and len(b) == len(logs[1]["rendered"])
    assert not a & b and len(a | b) == 22  # every frame rendered exactly once, by one rank
    assert len(a) == 12 and len(b) == 10  # blocks of 4: rank 0 has blocks 0, 2, 4; rank 1 has 1, 3, 5 (2 frames)
    out = tmp_path / "dist.gif"
    np.testing.assert_array_equal(read_video(out)[0], read_video(single)[0])
    man = json.loads(manifest_path(out).read_text())
    assert man["distributed"] == {"world_size": 2, "frames_rendered_by_rank": [12, 10]}
    assert man["frames_reused_from_cache"] == 0
    assert len(list(cache_dir(out).glob("*.safetensors"))) == 22  # keep_cache=True
    assert not list(tmp_path.glob(".*.lock"))


def test_a_failed_distributed_render_fails_on_every_rank_and_resumes(tmp_path):
    single = render_morph(FakeBackend(compute_batch=4), _settings(), tmp_path / "single.gif", progress=False)
    logs = _launch(tmp_path, "dist.gif", fail_on_rank=1)
    assert all("rank 1: RuntimeError: simulated crash" in log["error"] for log in logs)  # nobody waits forever
    out = tmp_path / "dist.gif"
    assert not out.exists() and not manifest_path(out).exists()
    kept = len(list(cache_dir(out).glob("*.safetensors")))
    assert kept == 12 + 4  # rank 0's share and rank 1's first block
    assert not list(tmp_path.glob(".*.lock"))
    logs = _launch(tmp_path, "dist.gif")  # the same command again
    assert len(logs[0]["rendered"]) + len(logs[1]["rendered"]) == 22 - kept  # only what was missing
    np.testing.assert_array_equal(read_video(out)[0], read_video(single)[0])
    man = json.loads(manifest_path(out).read_text())
    assert man["frames_reused_from_cache"] == kept


def test_the_ranks_leave_together_and_learn_whether_rank_0_wrote_the_video(tmp_path):
    """A rank whose share is done waits for rank 0's final write before it returns (a rank that exits while another
    still works can abort in gloo's teardown and fail the launch), and learns whether that write failed."""
    logs = _launch(tmp_path, "slow.gif", write="slow")
    assert all(log["error"] is None for log in logs)
    written = manifest_path(tmp_path / "slow.gif").stat().st_mtime
    assert logs[1]["returned"] >= written  # rank 1 returned after rank 0 wrote the manifest (half a second late)
    logs = _launch(tmp_path, "fails.gif", write="fails")
    assert logs[0]["error"] == "OSError: simulated disk failure"  # rank 0 raises its own exception
    assert logs[1]["error"].startswith(f"RuntimeError: rank 0 could not write {tmp_path / 'fails.gif'}")
    assert "rank 0: OSError: simulated disk failure" in logs[1]["error"]
    assert len(list(cache_dir(tmp_path / "fails.gif").glob("*.safetensors"))) == 22  # every frame kept
    assert not list(tmp_path.glob(".*.lock"))


@pytest.mark.skipif(not Path(sys.executable).with_name("accelerate").exists(), reason="no accelerate launcher")
@pytest.mark.slow
def test_cli_morph_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    """The README's command, unchanged, under `accelerate launch --multi_gpu --num_processes 2` (on a machine
    without CUDA accelerate's launcher starts two gloo processes; PartialState(cpu=True) makes them ranks 0 and 1)."""
    out = tmp_path / "m.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "latentlab.cli", "morph", "a large red circle on a blue background",
           "a small yellow star on a black background", "--frames", "12", "--steps", "6", "-o", str(out)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads(manifest_path(out).read_text())
    assert man["distributed"]["world_size"] == 2
    assert sum(man["distributed"]["frames_rendered_by_rank"]) == 12 and min(
        man["distributed"]["frames_rendered_by_rank"]) > 0
    frames, _ = read_video(out)
    assert len(frames) == 12
    # The same frames as one process running the same command (the encoder is deterministic given the frames).
    import torch

    from latentlab import cli

    one = tmp_path / "one.mp4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: at some batch sizes the last bits depend on the thread count
    try:
        assert cli.main(["morph", "a large red circle on a blue background", ("a small yellow star on a black "
                         "background"), "--frames", "12", "--steps", "6", "-o", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(frames, read_video(one)[0])


def _rank_grid(out: str) -> None:
    from latentlab import cli

    code = cli.main(["grid", "a red star", "a blue ring", "--seeds", "1", "2", "3", "--steps", "4", "-o", out])
    Path(out + f".rank{ranks().rank}").write_text(str(code))


@pytest.mark.slow
def test_cli_grid_under_two_processes_equals_one_process(tmp_path):
    from latentlab import cli

    one = tmp_path / "one.png"
    assert cli.main(["grid", "a red star", "a blue ring", "--seeds", "1", "2", "3", "--steps", "4",
                     "-o", str(one)]) == 0
    two = tmp_path / "two.png"
    accelerate.debug_launcher(_rank_grid, args=(str(two),), num_processes=2)
    assert (tmp_path / "two.png.rank0").read_text() == "0" == (tmp_path / "two.png.rank1").read_text()
    from latentlab.video import read_image

    np.testing.assert_array_equal(np.asarray(read_image(two)), np.asarray(read_image(one)))
