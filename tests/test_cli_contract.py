"""The CLI's contract, generated from its own parser: every option of every subcommand, given a bad value, ends
with exit code 2 and one line that names the option, before any model loads. New options are covered the day they
are added (the inventory is the parser itself)."""

from __future__ import annotations

import argparse

import pytest

from latentlab import cli

#: A valid invocation of each subcommand, to which one bad option is appended.
BASE = {"morph": ["a red star", "a blue ring"], "walk": ["a red star", "--seeds", "1", "2"], "grid": ["a red star"],
        "frame": ["MANIFEST", "0"], "export": ["MANIFEST"], "info": []}
BAD_NUMBERS = ["-1", "nan", "inf", "-inf", "abc", "1e309", ""]


def _options():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        for act in sp._actions:
            if not act.option_strings or act.nargs == 0 or isinstance(act, argparse._HelpAction):
                continue
            yield name, act


def _cases():
    for name, act in _options():
        opt = act.option_strings[-1]
        if act.choices is not None:
            yield name, opt, "no-such-choice"
        elif act.type in (int, float):
            for bad in BAD_NUMBERS:
                yield name, opt, bad
        elif act.dest in ("audio", "images", "pacing_clip"):
            yield name, opt, "/no/such/file.wav" if act.dest == "audio" else "/no/such/thing"


CASES = list(_cases())


@pytest.fixture(scope="module")
def _manifest_file(tmp_path_factory):
    from fakes import FakeBackend

    from latentlab.morph import Keyframe, MorphSettings, manifest_path, render_morph

    out = tmp_path_factory.mktemp("manifest") / "m.mp4"
    s = MorphSettings(keyframes=(Keyframe("a red star", 1), Keyframe("a blue ring", 2)), n_frames=4)
    return manifest_path(render_morph(FakeBackend(), s, out, progress=False))


def test_every_option_is_covered():
    """Options that take a value are either probed here or are free text by nature (prompts, model ids, paths
    of outputs): a new numeric or choice option cannot slip through."""
    free_text = {"negative_prompt", "model", "output", "workers"}
    probed = {(n, o) for n, o, _ in CASES}
    for name, act in _options():
        if act.dest not in free_text:
            assert (name, act.option_strings[-1]) in probed, f"{name} {act.option_strings[-1]} is not probed"


@pytest.mark.parametrize("name, opt, bad", CASES, ids=[f"{n}{o}={b!r}" for n, o, b in CASES])
def test_a_bad_value_is_one_line_and_exit_2_before_any_model(name, opt, bad, tmp_path, capsys, monkeypatch,
                                                            _manifest_file):
    _manifest = _manifest_file
    monkeypatch.setattr(cli, "_load_lab", lambda *a, **k: pytest.fail("a model was loaded"))
    manifest = tmp_path / "m.mp4.json"
    manifest.write_bytes(_manifest.read_bytes())  # a real, valid manifest: only the option is wrong
    args = [name, *[str(manifest) if a == "MANIFEST" else a for a in BASE[name]]]
    if name in ("morph", "walk", "grid", "frame"):
        args += ["-o", str(tmp_path / ("out.mp4" if name in ("morph", "walk") else "out.png"))]
    try:
        code = cli.main([*args, opt, bad])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    named = {opt, opt.lstrip("-"), opt.lstrip("-").replace("-", "_")}
    assert any(n in err for n in named), f"the message does not name {opt}: {err}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mp4.json"]  # nothing written
