"""Every path argument of every public file writer and reader, tried systematically (issue: contract everywhere).

Writers: missing parent folder, an existing directory as the target, spaces and non-ASCII in the name, an existing
file without ``overwrite`` (left byte for byte as it was), a read-only folder (where this user cannot bypass
permissions). Readers: missing file, a directory, an empty file, a truncated file, random bytes. Each call ends in
the right result (a round trip through the matching reader) or in ``FileNotFoundError``/``FileExistsError``/
``PermissionError``/``IsADirectoryError``/``ValueError`` that names the path; nothing half-written is left in the
folder. The inventory is checked against the modules' public functions, so a new writer or reader without a row
here fails ``test_the_inventory_covers_every_public_file_function``.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch

from latentlab import exports, store, video
from latentlab.atlas import Atlas
from latentlab.backend import Conditioning
from latentlab.morph import manifest as manifest_module

ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


def _atlas():
    g = torch.Generator().manual_seed(0)
    n = 4
    noise = torch.randn(n, 4, 4, 4, generator=g)
    emb = torch.randn(n, 8, generator=g)
    return Atlas(noise, noise.clone(), emb, emb.clone(), torch.zeros(n, 3, 8, 8, dtype=torch.uint8),
                 [{"prompt": f"p{i}", "seed": i} for i in range(n)])


def _image():
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))


#: name -> (suffix, write(path, overwrite), read(path) -> something comparable, expected read result or None)
WRITERS = {
    "store.save": (".safetensors", lambda p, o: store.save(p, {"x": torch.ones(2, 3)}, overwrite=o),
                   lambda p: store.load(p)[0]["x"], torch.ones(2, 3)),
    "video.write_video": (".mp4", lambda p, o: video.write_video(p, torch.rand(3, 3, 16, 16), fps=4, overwrite=o),
                          lambda p: video.read_video(p)[0].shape[0], 3),
    "video.write_image": (".png", lambda p, o: video.write_image(p, _image(), overwrite=o),
                          lambda p: tuple(video.read_image(p).shape), (1, 3, 16, 16)),
    "exports.write_comfyui_latent": (".latent", lambda p, o: exports.write_comfyui_latent(
        torch.ones(1, 4, 2, 2), p, scaling_factor=0.5, overwrite=o),
        lambda p: exports.read_comfyui_latent(p, scaling_factor=0.5), torch.ones(1, 4, 2, 2)),
    "exports.write_comfyui_conditioning": (".safetensors", lambda p, o: exports.write_comfyui_conditioning(
        Conditioning(torch.ones(2, 3, 4)), p, overwrite=o), lambda p: len(exports.read_comfyui_conditioning(p)), 2),
    "exports.save_direction": (".npy", lambda p, o: exports.save_direction(torch.ones(4, 2, 2), p, overwrite=o),
                               lambda p: exports.load_direction(p), torch.ones(4, 2, 2)),
    "Atlas.save": (".safetensors", lambda p, o: _atlas().save(p, overwrite=o), lambda p: len(Atlas.load(p)), 4),
}

#: reader name -> (suffix, read(path), writer that makes a valid file of its format)
READERS = {
    "store.load": (".safetensors", store.load, "store.save"),
    "video.read_video": (".mp4", video.read_video, "video.write_video"),
    "video.read_image": (".png", video.read_image, "video.write_image"),
    "video.decode_audio": (".wav", video.decode_audio, None),
    "exports.read_comfyui_latent": (".latent", lambda p: exports.read_comfyui_latent(p, scaling_factor=0.5),
                                    "exports.write_comfyui_latent"),
    "exports.read_comfyui_conditioning": (".safetensors", exports.read_comfyui_conditioning,
                                          "exports.write_comfyui_conditioning"),
    "exports.load_direction": (".npy", exports.load_direction, "exports.save_direction"),
    "exports.read_deforum_schedule": (".json", exports.read_deforum_schedule, None),
    "Atlas.load": (".safetensors", Atlas.load, "Atlas.save"),
    "morph.read_manifest": (".json", manifest_module.read_manifest, None),
}


def _same(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and torch.equal(a, b)
    return tuple(a) == tuple(b) if isinstance(b, tuple) else a == b


def _names_path(e: BaseException, path) -> bool:
    text = str(e)
    return str(path) in text or os.path.basename(str(path)) in text


def _leftovers(folder, keep=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_the_inventory_covers_every_public_file_function():
    """A public write*/save*/read*/load*/decode* function of these modules without a row above fails here."""
    covered = {n.split(".")[-1] for n in (*WRITERS, *READERS)}
    for mod in (store, video, exports, manifest_module):
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) and name.startswith(("write", "save", "read", "load", "decode")) \
                    and "path" in inspect.signature(obj).parameters | {"manifest": None}:
                if name in ("write_manifest", "write_deforum_schedule", "mux_audio"):
                    continue  # below: manifests are written by renders; deforum needs settings; mux in test_music
                assert name in covered, f"{mod.__name__}.{name} takes a path: add it to WRITERS/READERS"


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writers_handle_every_kind_of_path(name, tmp_path):
    suffix, write, read, want = WRITERS[name]
    # spaces and non-ASCII: the right result, read back
    odd = tmp_path / f"my renders ü 日本{suffix}"
    write(odd, False)
    assert _same(read(odd), want)
    # an existing file without overwrite: refused, named, untouched; with overwrite: replaced
    before = odd.read_bytes()
    with pytest.raises(FileExistsError) as e:
        write(odd, False)
    assert _names_path(e.value, odd) and odd.read_bytes() == before
    write(odd, True)
    assert _same(read(odd), want)
    # a missing parent folder: created, or refused naming the path -- never a half-written file
    deep = tmp_path / "new" / "deeper" / f"out{suffix}"
    try:
        write(deep, False)
        assert _same(read(deep), want)
    except ERRORS as e:
        assert _names_path(e, deep.parent) or _names_path(e, deep), e
    # an existing directory as the target
    folder = tmp_path / f"a folder{suffix}"
    folder.mkdir()
    with pytest.raises(ERRORS) as e:
        write(folder, True)
    assert _names_path(e.value, folder) and folder.is_dir()
    keep = {odd.name, "new", folder.name, *(p.name for p in odd.parent.glob(odd.name + ".json"))}
    assert _leftovers(tmp_path, keep) == [], "a temporary or half-written file was left behind"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root bypasses folder permissions")
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writers_into_a_read_only_folder_raise_permission_error(name, tmp_path):
    suffix, write, _, _ = WRITERS[name]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as e:
            write(ro / f"out{suffix}", False)
        assert "ro" in str(e.value)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0), reason="the test above runs as this user")
def test_writers_into_a_read_only_folder_raise_permission_error_as_an_unprivileged_user():
    """The same promise where the suite runs as root (CI here): root bypasses folder permissions, so every writer
    runs in a forked child that has dropped to the unprivileged ``nobody`` user (a fork, not a new interpreter: this
    one may live where ``nobody`` cannot read, e.g. under /root)."""
    import json
    import select
    import signal
    import tempfile
    from pathlib import Path

    ro = Path(tempfile.mkdtemp(prefix="ll-ro-", dir="/tmp"))  # /tmp: reachable by nobody (pytest's tmp is not)
    ro.chmod(0o555)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, try every writer, report, exit without running pytest's teardown
        code = 1
        try:
            torch.set_num_threads(1)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            results = {}
            for name, (suffix, write, _, _) in sorted(WRITERS.items()):
                try:
                    write(ro / f"out{suffix}", False)
                    results[name] = "written"
                except Exception as e:  # noqa: BLE001 -- reported to the parent, which asserts on it
                    results[name] = [type(e).__name__, str(e)]
            os.write(write_end, json.dumps(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        chunks = []
        while select.select([read_end], [], [], 300)[0]:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
        assert os.waitpid(pid, 0)[1] == 0, "the unprivileged child failed or hung"
        results = json.loads(b"".join(chunks))
        assert sorted(results) == sorted(WRITERS)
        for name, got in results.items():
            assert got != "written" and got[0] == "PermissionError", f"{name}: {got}"
            assert str(ro) in got[1], f"{name}: the message does not name the folder: {got[1]}"
        assert list(ro.iterdir()) == []
    finally:
        os.close(read_end)
        ro.chmod(0o755)
        for p in ro.iterdir():
            p.unlink()
        ro.rmdir()


def _valid_file(tmp_path, reader: str):
    suffix, _, writer = READERS[reader]
    p = tmp_path / f"valid{suffix}"
    if writer is not None:
        WRITERS[writer][1](p, False)
    elif suffix == ".wav":
        from latentlab.benchmarks.audio import write_wav

        write_wav(p, np.sin(np.linspace(0, 400, 22050)).astype(np.float32))
    elif reader == "exports.read_deforum_schedule":
        p.write_text('{"prompts": {"0": "a red star", "10": "a blue ring"}, "seed": "0:(1), 10:(2)"}')
    else:  # a manifest
        p.write_text('{"manifest_version": 1, "frames": []}')
    return p


@pytest.mark.parametrize("damage", ["missing", "directory", "empty", "truncated", "random"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_readers_refuse_every_kind_of_bad_file_naming_it(reader, damage, tmp_path):
    suffix, read, _ = READERS[reader]
    valid = _valid_file(tmp_path, reader)
    bad = tmp_path / f"bad file{suffix}"
    if damage == "directory":
        bad.mkdir()
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        data = valid.read_bytes()
        bad.write_bytes(data[: max(1, len(data) // 2)])
    elif damage == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    if reader == "video.decode_audio" and damage == "truncated":
        # audio is a stream: ffmpeg decodes the part that is there (the right result for a cut recording)
        got, full = read(bad), read(valid)
        assert 0 < len(got) < len(full) and np.array_equal(got, full[: len(got)])
        return
    with pytest.raises(ERRORS) as e:
        read(bad)
    assert _names_path(e.value, bad), f"{reader} on a {damage} file: {type(e.value).__name__}: {e.value}"


# --- two processes writing the same output ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_file_another_process_finished_meanwhile_is_never_clobbered(name, tmp_path, monkeypatch):
    """Both writers checked that the output did not exist; the other finished first. Without ``overwrite`` this one
    must end in FileExistsError naming the path, leave the other's file byte for byte, and leave no temporary file;
    with ``overwrite`` it replaces it (the user asked)."""
    from latentlab import _files

    suffix, write, read, expected = WRITERS[name]
    target = tmp_path / f"out{suffix}"
    real_finish, raced = _files.finish, []

    def finish_after_the_other_process(tmp, path, *, overwrite):
        if not raced:
            path.write_bytes(b"the other process's file")
            raced.append(path)
        return real_finish(tmp, path, overwrite=overwrite)

    for module in (_files, video):
        monkeypatch.setattr(module, "finish", finish_after_the_other_process)
    with pytest.raises(FileExistsError) as e:
        write(target, False)
    assert raced == [target], f"{name} does not move its file into place through _files.finish"
    assert _names_path(e.value, target)
    assert target.read_bytes() == b"the other process's file"
    assert _leftovers(tmp_path, {target.name}) == []
    raced.clear()
    write(target, True)
    got = read(target)
    assert (torch.equal(got, expected) if isinstance(expected, torch.Tensor) else got == expected)


_RACER = """
import sys, time
from pathlib import Path
import torch
from latentlab import store
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    store.save(sys.argv[1], {"x": torch.full((256, 1024), float(sys.argv[3]))})
    print("saved")
except FileExistsError as e:
    print("refused:", e)
"""


@pytest.mark.slow
def test_two_processes_saving_the_same_file_one_wins_whole(tmp_path):
    """A real race, repeated: two processes released together save the same path without ``overwrite``. Whatever
    the timing, exactly one saves, the other is refused with FileExistsError, and the file is the winner's, whole."""
    import subprocess
    import sys
    import time

    for round_ in range(3):
        out, go = tmp_path / f"race{round_}.safetensors", tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(go), str(k)], stdout=subprocess.PIPE,
                                  text=True) for k in (1, 2)]
        time.sleep(3)  # both have imported torch and wait for the start line (a late one still races or is refused)
        go.touch()
        said = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert sorted(s.split(":")[0] for s in said) == ["refused", "saved"], said
        winner = 1.0 if said[0] == "saved" else 2.0
        assert torch.equal(store.load(out)[0]["x"], torch.full((256, 1024), winner))
        assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name], "a temporary file was left"
