"""Small helpers shared by tests: a free port (servers, launchers); two prompts and the identities of their mixes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A local port nothing listens on now (a fixed one fails while an earlier run's socket lingers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_prompts(lab, size=None):
    """Two items' noise (seeds 3, 4) and the conditionings of "a red star" and "a blue ring" for each."""
    kw = {} if size is None else {"height": size, "width": size}
    z = lab.noise([3, 4], **kw)
    a = lab.encode_prompt(["a red star", "a red star"])
    b = lab.encode_prompt(["a blue ring", "a blue ring"])
    return z, a, b


def mix_identities(lab, record, z, a, b, guidance: float, same_weight) -> dict:
    """What a prompt mix (``record``: PredictionMix or AttentionMix) must satisfy, as largest latent differences:
    weights 0 and 1 against each prompt alone (``ends_a``, ``ends_b``), ``a`` mixed with itself at
    ``same_weight`` against ``a`` alone (``same``), and weight 0.5 against each prompt alone (``mid_a``,
    ``mid_b``); the caller asserts its own bounds."""
    import torch

    def gen(c):
        return lab.generate(z, c, guidance_scale=guidance, output_type="latent")

    def diff(x, y):
        return float((x - y).abs().max())

    only_a, only_b = gen(a), gen(b)
    ends = gen(record(a, b, torch.tensor([0.0, 1.0])))
    same = gen(record(a, a, torch.tensor(same_weight)))
    mid = gen(record(a, b, torch.tensor([0.5, 0.5])))
    return {"ends_a": diff(ends[0], only_a[0]), "ends_b": diff(ends[1], only_b[1]), "same": diff(same, only_a),
            "mid_a": diff(mid, only_a), "mid_b": diff(mid, only_b)}
