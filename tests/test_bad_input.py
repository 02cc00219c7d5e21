"""Bad input, table-driven: every kind must end in a clear message naming the argument (what was expected and
what was received), before any model work where possible, and with nothing left behind (no empty cache folders,
no partial files, no overwritten user files)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from latentlab import cli

P1, P2 = "a large red star on a blue background", "a small green ring on a black background"


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture()
def no_model(monkeypatch):
    def boom(model):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_lab", boom)


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "mine.mp4").write_bytes(b"the user's own video")
    (tmp_path / "mine.mp4.json").write_text("{}")
    (tmp_path / "a-folder.mp4").mkdir()
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "clip-no-weights").mkdir()
    (tmp_path / "clip-no-weights" / "config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text('{"model_type": "t5"}')
    (tmp_path / "grid.png").write_bytes(b"the user's own picture")
    return tmp_path


# (id, argv with {d} for the work folder, expected exit code, message regex)
CLI_BEFORE_ANY_MODEL = [
    ("guidance-nan", ["morph", P1, P2, "--guidance", "nan", "-o", "{d}/o.mp4"], 2, r"`guidance_scale` must be a finite number, got nan"),
    ("guidance-inf", ["morph", P1, P2, "--guidance", "inf", "-o", "{d}/o.mp4"], 2, r"`guidance_scale` must be a finite number, got inf"),
    ("guidance-negative", ["morph", P1, P2, "--guidance", "-1", "-o", "{d}/o.mp4"], 2, r"`guidance_scale` must be >= 0, got -1.0"),
    ("steps-zero", ["morph", P1, P2, "--steps", "0", "-o", "{d}/o.mp4"], 2, r"`num_inference_steps` must be >= 1, got 0"),
    ("steps-absurd", ["morph", P1, P2, "--steps", "100000", "-o", "{d}/o.mp4"], 2, r"`num_inference_steps` must be <= 1000, got 100000"),
    ("seconds-zero", ["morph", P1, P2, "--seconds", "0", "-o", "{d}/o.mp4"], 2, r"`seconds` must be > 0, got 0.0"),
    ("seconds-nan", ["morph", P1, P2, "--seconds", "nan", "-o", "{d}/o.mp4"], 2, r"`seconds` must be a finite number"),
    ("seconds-too-short", ["morph", P1, P2, "--seconds", "0.05", "-o", "{d}/o.mp4"], 2, r"gives 1 frame\(s\); a morph needs at least 2"),
    ("frames-and-seconds", ["morph", P1, P2, "--frames", "8", "--seconds", "0.5", "-o", "{d}/o.mp4"], 2, r"give --frames or --seconds, not both"),
    ("frames-one", ["morph", P1, P2, "--frames", "1", "-o", "{d}/o.mp4"], 2, r"`n_frames` must be >= 2, got 1"),
    ("frames-absurd", ["morph", P1, P2, "--frames", "100000000", "-o", "{d}/o.mp4"], 2, r"`n_frames` must be <= 1,000,000, got 100,000,000 \(its plan alone would need ~\d+\.\d GiB"),
    ("upscale-absurd", ["morph", P1, P2, "--upscale", "1000", "-o", "{d}/o.mp4"], 2, r"`upscale` 1000 makes 64000x64000 frames .* would need ~\d+ GiB of memory"),
    ("upscale-zero", ["morph", P1, P2, "--upscale", "0", "-o", "{d}/o.mp4"], 2, r"`upscale` must be >= 1, got 0"),
    ("batch-size-zero", ["morph", P1, P2, "--batch-size", "0", "-o", "{d}/o.mp4"], 2, r"`batch_size` must be >= 1, got 0"),
    ("fps-zero", ["morph", P1, P2, "--fps", "0", "-o", "{d}/o.mp4"], 2, r"`fps` must be >= 0.01, got 0.0"),
    ("fps-tiny", ["morph", P1, P2, "--fps", "1e-6", "-o", "{d}/o.mp4"], 2, r"`fps` must be >= 0.01, got 1e-06"),
    ("fps-nan", ["morph", P1, P2, "--fps", "nan", "-o", "{d}/o.mp4"], 2, r"`fps` must be a finite number, got nan"),
    ("seed-negative", ["morph", P1, "--seeds", "-1", "2", "-o", "{d}/o.mp4"], 2, r"`--seeds` must be in \[0, 2\*\*64\), got -1"),
    ("seed-too-big", ["morph", P1, "--seeds", str(2**64), "2", "-o", "{d}/o.mp4"], 2, r"`--seeds` must be in \[0, 2\*\*64\)"),
    ("wrong-suffix", ["morph", P1, P2, "-o", "{d}/o.avi"], 2, r"`output` must end in one of \('.mp4', '.gif'\), got 'o.avi'"),
    ("output-is-a-folder", ["morph", P1, P2, "-o", "{d}/a-folder.mp4"], 2, r"`output` is a folder, not a file: .*a-folder.mp4"),
    ("output-folder-missing", ["morph", P1, P2, "-o", "{d}/no/such/folder/o.mp4"], 2, r"the folder of `output` does not exist"),
    ("output-exists", ["morph", P1, P2, "-o", "{d}/mine.mp4"], 2, r"mine.mp4 exists; pass overwrite=True \(CLI: --overwrite\)"),
    ("image-not-an-image", ["morph", P1, P2, "--images", "{d}/not-an-image.png", "none", "-o", "{d}/o.mp4"], 2, r"`keyframes\[0\].image` is not a readable image: .*not-an-image.png"),
    ("image-missing", ["morph", P1, P2, "--images", "{d}/missing.png", "none", "-o", "{d}/o.mp4"], 2, r"`keyframes\[0\].image` does not exist: .*missing.png"),
    ("images-count", ["morph", P1, P2, "--images", "none", "-o", "{d}/o.mp4"], 2, r"--images must give one image \(or 'none'\) per keyframe: 2 keyframes, got 1"),
    ("prompt-not-utf8", ["morph", "a red \udcff star", P2, "-o", "{d}/o.mp4"], 2, r"`keyframes\[0\].prompt` is not valid UTF-8 text"),
    ("one-keyframe", ["morph", P1, "-o", "{d}/o.mp4"], 2, r"a morph needs two keyframes"),
    ("seeds-prompts-mismatch", ["morph", P1, P2, "a", "--seeds", "1", "2", "-o", "{d}/o.mp4"], 2, r"give one prompt, one seed, or as many seeds as prompts: got 3 prompts and 2 seeds"),
    ("walk-one-seed", ["walk", P1, "--seeds", "1", "-o", "{d}/w.mp4"], 2, r"a walk needs one prompt and at least two --seeds, got 1 prompt\(s\) and 1 seed\(s\)"),
    ("grid-steps-zero", ["grid", P1, "--steps", "0", "-o", "{d}/g.png"], 2, r"`num_inference_steps` must be >= 1, got 0"),
    ("grid-seed-negative", ["grid", P1, "--seeds", "-5", "-o", "{d}/g.png"], 2, r"--seeds must be in \[0, 2\*\*64\), got -5"),
    ("grid-upscale-zero", ["grid", P1, "--upscale", "0", "-o", "{d}/g.png"], 2, r"`--upscale` must be >= 1, got 0"),
    ("grid-output-exists", ["grid", P1, "-o", "{d}/grid.png"], 2, r"grid.png exists; pass overwrite=True"),
    ("grid-too-big", ["grid", *[P1] * 40, "--seeds", *map(str, range(40)), "--upscale", "64", "-o", "{d}/g.png"], 2, r"the grid would be \d+x\d+ pixels"),
    ("clip-no-weights", ["morph", P1, P2, "--pacing", "even", "--pacing-clip", "{d}/clip-no-weights", "-o", "{d}/o.mp4"], 2, r"`--pacing-clip` has no safetensors weights"),
    ("clip-not-clip", ["morph", P1, P2, "--pacing", "even", "--pacing-clip", "{d}/not-clip", "-o", "{d}/o.mp4"], 2, r"`--pacing-clip` is not a CLIP model: .* model_type 't5'"),
    ("frame-manifest-missing", ["frame", "{d}/nope.json", "0", "-o", "{d}/f.png"], 2, r"no such manifest: .*nope.json"),
]


@pytest.mark.parametrize("case", CLI_BEFORE_ANY_MODEL, ids=[c[0] for c in CLI_BEFORE_ANY_MODEL])
def test_cli_refuses_bad_input_before_any_model_work(case, workdir, no_model, capsys):
    _, argv, code, pattern = case
    before = _files(workdir)
    assert cli.main([a.replace("{d}", str(workdir)) for a in argv]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, never a traceback
    assert err.startswith(f"latentlab {argv[0]}: error: ")
    import re

    assert re.search(pattern, err), err
    assert _files(workdir) == before  # nothing left behind
    assert (workdir / "mine.mp4").read_bytes() == b"the user's own video"


@pytest.fixture(scope="module")
def good_manifest(tmp_path_factory):
    """A real manifest, rendered on the fake backend."""
    from fakes import FakeBackend

    from latentlab.morph import Keyframe, MorphSettings, manifest_path, render_morph

    d = tmp_path_factory.mktemp("manifest")
    out = render_morph(FakeBackend(), MorphSettings(keyframes=(Keyframe("a", 1), Keyframe("b", 2)), n_frames=4),
                       d / "m.gif", progress=False)
    return json.loads(manifest_path(out).read_text())


def _bad_manifests(good):
    no_frames = {k: v for k, v in good.items() if k != "frames"}
    return [
        ("truncated", json.dumps(good)[:200], r"is not valid JSON .*truncated or edited"),
        ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", r"is not a latentlab manifest \(binary, not UTF-8 JSON text\)"),
        ("json-list", "[1, 2, 3]", r"is not a latentlab manifest \(its JSON is a list, not an object\)"),
        ("no-version", json.dumps({"video": "x"}), r"is not a latentlab video manifest \(no integer manifest_version\)"),
        ("missing-keys", json.dumps(no_frames), r"is missing key\(s\) \['frames'\]"),
        ("unknown-keys", json.dumps({**good, "colour_grading": 1}), r"has unknown key\(s\) \['colour_grading'\]"),
        ("future-version", json.dumps({**good, "manifest_version": 99}), r"was written by a newer latentlab \(manifest_version 99"),
        ("bad-settings", json.dumps({**good, "settings": {**good["settings"], "n_frames": 0}}), r"has invalid settings: `n_frames` must be >= 2"),
        ("nan-guidance", json.dumps({**good, "sampling": {**good["sampling"], "guidance_scale": float("nan")}}), r"`guidance_scale` must be a finite number"),
        ("bad-upscale", json.dumps({**good, "upscale": "big"}), r"has an invalid `upscale` \('big'\); give --upscale"),
        ("nested-prompt", json.dumps({**good, "settings": {**good["settings"], "keyframes": [
            {**good["settings"]["keyframes"][0], "prompt": 5}, good["settings"]["keyframes"][1]]}}),
         r"`keyframes\[0\]\.prompt` must be a string, got int"),
    ]


def test_cli_frame_refuses_every_kind_of_damaged_manifest(good_manifest, tmp_path, no_model, capsys):
    cases = _bad_manifests(good_manifest)
    assert len(cases) == 11
    import re

    for name, content, pattern in cases:
        path = tmp_path / f"{name}.json"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        assert cli.main(["frame", str(path), "0", "-o", str(tmp_path / "f.png")]) == cli.EXIT_USAGE, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), (name, err)
        assert not (tmp_path / "f.png").exists()


def test_cli_missing_models_exit_3_with_one_line(tmp_path, good_manifest, capsys, monkeypatch):
    import huggingface_hub.constants

    bin_only = tmp_path / "bin-only"
    (bin_only / "unet").mkdir(parents=True)
    (bin_only / "model_index.json").write_text("{}")
    (bin_only / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [
        (["morph", P1, P2, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o.mp4")],
         r"`model_id_or_path` is not a folder: .*no-such-model"),
        (["morph", P1, P2, "--model", str(bin_only), "-o", str(tmp_path / "o.mp4")],
         r"has no .safetensors weights: .*latentlab loads only safetensors"),
        (["grid", P1, "--model", "someone/not-downloaded-model", "-o", str(tmp_path / "g.png")],
         r"could not load `model_id_or_path` 'someone/not-downloaded-model': it is not in the local Hugging Face cache .*offline\?"),
    ]
    manifest = tmp_path / "elsewhere.json"
    manifest.write_text(json.dumps({**good_manifest, "model": str(tmp_path / "deleted-model")}))
    cases.append((["frame", str(manifest), "0", "-o", str(tmp_path / "f.png")], r"is not a folder: .*deleted-model"))
    import re

    for argv, pattern in cases:
        assert cli.main(argv) == cli.EXIT_MISSING, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin-only", "elsewhere.json"]


def test_cli_read_only_output_folder(tmp_path, no_model, capsys, monkeypatch):
    """(Tests run as root, for whom every folder is writable: the permission check is simulated.)"""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert cli.main(["morph", P1, P2, "-o", str(tmp_path / "o.mp4")]) == cli.EXIT_USAGE
    assert "the folder of `output` is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("workers,frames", [("1", 8), ("2", 16)])
def test_cli_disk_full_keeps_the_frames_and_says_what_to_do(tiny_lab, tmp_path, monkeypatch, capsys, workers, frames):
    """In this process, or in worker processes (each worker's disk fills after its 4th frame)."""
    import errno

    from latentlab import store
    from latentlab.morph import cache_dir

    monkeypatch.setattr(cli, "_load_lab", lambda model: tiny_lab)
    real_save, saved = store.save, []

    def full_after_4(*a, **k):
        if len(saved) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return real_save(*a, **k)

    monkeypatch.setattr(store, "save", full_after_4)
    argv = ["morph", "a", "b", "--frames", str(frames), "--steps", "1", "--batch-size", "4", "--model", "x",
            "--workers", workers, "-o", str(tmp_path / "m.gif")]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "is full" in err and "free some space and run the same command again" in err
    kept = len(list(cache_dir(tmp_path / "m.gif").glob("*.safetensors")))
    # One process: exactly its 4 frames. Workers: the first failure stops the render, and the other worker may be
    # stopped before or after its own 4th frame.
    assert kept == 4 if workers == "1" else 4 <= kept <= 8
    assert not (tmp_path / "m.gif").exists() and not list(tmp_path.glob(".m.*partial*"))
    monkeypatch.setattr(store, "save", real_save)
    assert cli.main(argv) == 0  # resumes
    assert (tmp_path / "m.gif").exists()


def test_cli_second_render_to_the_same_output_exits_1(tmp_path, no_model, monkeypatch, capsys, tiny_lab):
    import subprocess
    import sys

    monkeypatch.setattr(cli, "_load_lab", lambda model: tiny_lab)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".m.gif.lock").write_text(str(holder.pid))
        assert cli.main(["morph", "a", "b", "--frames", "2", "--steps", "1", "--model", "x",
                         "-o", str(tmp_path / "m.gif")]) == cli.EXIT_FAILED
    finally:
        holder.kill()
        holder.wait()
    assert f"another render (process {holder.pid}) is writing" in capsys.readouterr().err


# --- the API ----------------------------------------------------------------------------------------------------


def _api_cases(lab):
    from latentlab.sampling import Sampling

    z, c = lab.noise([1, 2]), lab.encode_prompt(["a", "b"])
    nan_z = z.clone()
    nan_z[0, 0, 0, 0] = float("nan")
    nan_c = c.map(torch.clone)
    nan_c.prompt_embeds.fill_(float("inf"))  # changed in place after it was built (construction refuses it)
    img = torch.rand(1, 3, 16, 16)
    return [
        ("nan-latents", lambda: lab.generate(nan_z, c), ValueError, r"`latents` must be finite, got 1 NaN/infinite value\(s\) in a tensor of shape \(2, 4, 8, 8\)"),
        ("inf-conditioning", lambda: lab.generate(z, nan_c), ValueError, r"`conditioning.prompt_embeds` must be finite"),
        ("guidance-inf", lambda: lab.generate(z, c, guidance_scale=float("inf")), ValueError, r"`guidance_scale` must be a finite number, got inf"),
        ("guidance-str", lambda: lab.generate(z, c, guidance_scale="7"), TypeError, r"`guidance_scale` must be a real number, got str"),
        ("steps-float", lambda: lab.generate(z, c, num_inference_steps=2.5), TypeError, r"`num_inference_steps` must be an int, got float"),
        ("scheduler-unknown", lambda: Sampling(scheduler="Fast"), ValueError, r"`scheduler` must be a diffusers scheduler class name"),
        ("images-0-255", lambda: lab.encode(img * 255), ValueError, r"`images` values must be in \[0, 1\], got values in \[.*\]; divide 8-bit images by 255"),
        ("images-nan", lambda: lab.encode(img * float("nan")), ValueError, r"`images` must be finite"),
        ("decode-nan", lambda: lab.decode(nan_z), ValueError, r"`latents` must be finite"),
        ("mask-nan", lambda: lab.inpaint(z, c, torch.full((1, 1, 8, 8), float("nan"))), ValueError, r"`mask` must be finite"),
        ("mask-range", lambda: lab.inpaint(z, c, torch.full((1, 1, 8, 8), 2.0)), ValueError, r"`mask` values must be in \[0, 1\]"),
        ("strength-big", lambda: lab.img2img(z, c, strength=1.5), ValueError, r"`strength` must be in \(0, 1\], got 1.5"),
        ("seed-negative", lambda: lab.img2img(z, c, seed=-1), ValueError, r"`seed` must be in \[0, 2\*\*64\), got -1"),
        ("prompt-int", lambda: lab.encode_prompt(3), TypeError, r"`prompt` must be a string or a non-empty list of strings, got int"),
        ("prompt-list-int", lambda: lab.encode_prompt(["a", 3]), TypeError, r"`prompt\[1\]` must be a string, got int"),
        ("prompt-bad-utf8", lambda: lab.encode_prompt("a \udcff"), ValueError, r"`prompt` is not valid UTF-8 text"),
        ("batch-size-zero", lambda: lab.generate(z, c, batch_size=0), ValueError, r"`batch_size` must be >= 1, got 0"),
        ("sampling-dict", lambda: lab.generate(z, c, sampling={"num_inference_steps": 2}), TypeError, r"`sampling` must be a latentlab.Sampling, got dict"),
    ]


def test_lab_refuses_bad_input_with_clear_messages(tiny_lab):
    import re

    cases = _api_cases(tiny_lab)
    for name, call, exc, pattern in cases:
        with pytest.raises(exc) as info:
            call()
        assert re.search(pattern, str(info.value)), (name, str(info.value))


def test_long_prompt_truncation_is_one_warning_naming_the_limit(tiny_lab, caplog):
    long = " ".join(["red"] * 200)
    with pytest.warns(UserWarning) as record:
        tiny_lab.encode_prompt(long)
    msgs = [str(w.message) for w in record]
    assert len(msgs) == 1 and re_search(r"cut to the text encoder's limit of 16 tokens", msgs[0]), msgs
    assert len(msgs[0]) < 300  # not the whole dropped text
    assert not any("truncated" in r.getMessage() for r in caplog.records)  # diffusers' long log line is gone


def re_search(pattern, text):
    import re

    return re.search(pattern, text)


def test_files_and_projections_refuse_bad_input(tmp_path):
    import numpy as np

    from latentlab import store
    from latentlab.atlas import Atlas
    from latentlab.project import PCA, UMAP
    from latentlab.video import VideoWriter, write_image, write_video

    # NaN pixels are not written as black.
    with pytest.raises(ValueError, match=r"`image` must be finite"):
        write_image(tmp_path / "x.png", torch.full((3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"`frames` must be finite"):
        write_video(tmp_path / "x.mp4", torch.full((2, 3, 8, 8), float("nan")), fps=12)
    with pytest.raises(ValueError, match=r"`frames` must hold at least one frame, got 0"):
        write_video(tmp_path / "x.mp4", torch.zeros(0, 3, 8, 8), fps=12)
    with pytest.raises(ValueError, match=r"no frames were written to .*y.mp4; nothing was saved"), \
            VideoWriter(tmp_path / "y.mp4", fps=12):
        pass
    assert _files(tmp_path) == []  # no invalid video under the final name, no temporary file
    # store: shared memory is saved as copies; truncated or foreign files are named.
    base = torch.arange(12.0)
    store.save(tmp_path / "shared.safetensors", {"a": base, "view": base[:6]})
    t, _ = store.load(tmp_path / "shared.safetensors")
    assert torch.equal(t["view"], base[:6])
    data = (tmp_path / "shared.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable safetensors file \(truncated"):
        store.load(tmp_path / "cut.safetensors")
    (tmp_path / "png.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"png.safetensors is not a readable safetensors file"):
        store.load(tmp_path / "png.safetensors")
    with pytest.raises(ValueError, match=r"`tensors\['x'\]` must be finite"):
        store.save(tmp_path / "nan.safetensors", {"x": torch.tensor([float("nan")])})
    with pytest.raises(TypeError, match=r"`provenance` must be JSON-serialisable"):
        store.save(tmp_path / "p.safetensors", {"x": torch.zeros(1)}, provenance={"g": float("nan")})
    # An atlas whose items and tensors disagree.
    store.save(tmp_path / "atlas.safetensors", {"noise": torch.zeros(3, 4), "latents": torch.zeros(3, 4),
                                                "image_embeds": torch.zeros(3, 2), "prompt_embeds": torch.zeros(3, 2),
                                                "thumbnails": torch.zeros(3, 3, 2, 2, dtype=torch.uint8)},
               provenance={"items": [{"prompt": "a"}] * 2})
    with pytest.raises(ValueError, match=r"is not a consistent latentlab atlas: `noise` has 3 rows but there are 2"):
        Atlas.load(tmp_path / "atlas.safetensors")
    # Projections.
    with pytest.raises(ValueError, match=r"`X` is constant \(10 identical items\)"):
        PCA(2).fit(np.ones((10, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"UMAP needs more than `n_neighbors` = 15 samples, got 5"):
        UMAP().fit(np.random.default_rng(0).normal(size=(5, 3)))


def test_build_atlas_refuses_a_string_of_prompts():
    from fakes import FakeBackend

    from latentlab.atlas import build_atlas

    with pytest.raises(TypeError, match=r"`prompts` must be a list of strings \(one item per prompt\), got str"):
        build_atlas(FakeBackend(), "a red star", [1, 2], clip=object())
    with pytest.raises(TypeError, match=r"`seeds` must be a list of ints, got int"):
        build_atlas(FakeBackend(), ["a red star"], 1, clip=object())


@pytest.mark.slow
def test_umap_transform_checks_the_feature_count():
    import numpy as np

    from latentlab.project import UMAP

    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    u = UMAP(n_neighbors=5, pca_components=None).fit(x)
    with pytest.raises(ValueError, match=r"`X` items must have 6 values .* got 4"):
        u.transform(x[:, :4])



def test_info_says_what_a_bug_report_needs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("latentlab: ", "torch: ", "diffusers: ", "transformers: ", "CUDA available: ", "MPS available: ",
                   "default device: ", "torch threads: ", "embedded model embedded-shapes (default): ",
                   "embedded model embedded-shapes-flow: ", "model families: ", "ONNX Runtime (--onnx): "):
        assert needle in out, needle
    assert cli.main(["info", "--fingerprint"]) == 0
    assert "embedded model fingerprint: " in capsys.readouterr().out


@pytest.fixture()
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (where the machine allows mounting one: root in CI here), unmounted after the test."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=False,
                             capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-write test stands in")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def test_a_real_full_disk_mid_render_keeps_the_previous_video_and_the_frames_then_resumes(small_disk, monkeypatch,
                                                                                          capsys):
    """A render onto a 1 MiB tmpfs that fills mid-way (256 px frames): exit 1 with the designed message, the user's
    previous video and its manifest untouched, no partial file, the finished frames kept; with room made, the same
    command resumes and replaces the video."""
    import subprocess

    from fakes import FakeBackend

    from latentlab.morph import cache_dir

    monkeypatch.setattr(cli, "_load_lab", lambda model: FakeBackend(latent_size=64, factor=4))
    out = small_disk / "m.mp4"
    out.write_bytes(b"the previous video")
    (small_disk / "m.mp4.json").write_text('{"previous": true}')
    argv = ["morph", "a", "b", "--frames", "24", "--steps", "1", "--model", "x", "-o", str(out), "--overwrite"]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "is full" in err and "free some space and run the same command again" in err
    assert out.read_bytes() == b"the previous video" and json.loads((small_disk / "m.mp4.json").read_text()) == {
        "previous": True}
    assert not [p.name for p in small_disk.iterdir() if ".partial" in p.name]
    kept = len(list(cache_dir(out).glob("*.safetensors")))
    assert 0 < kept < 24
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert cli.main(argv) == 0
    assert out.read_bytes()[:20] != b"the previous video"[:20] and out.stat().st_size > 1000
