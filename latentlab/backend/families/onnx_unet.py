"""ONNX Runtime for a UNet's steps on the CPU: the same network, exported once, run by ONNX Runtime's fused kernels.

One responsibility, and the only module that imports ``onnxruntime`` (lazily; it is the optional extra
``latentlab[onnx]``). :meth:`~latentlab.backend.Lab.optimize` with ``onnx=True`` exports the model's UNet to ONNX
(float32; batch, latent size and token count dynamic; kept in :func:`cache_folder`) and makes the UNet's ``forward`` run through an ONNX
Runtime session wherever the call is one the export covers: a plain denoising call (the text conditioning alone, no
masks, no SDXL extras) under diffusers' default attention, the cached cross attention or attention interpolation
(:class:`~latentlab.backend.AttentionMix`: both prompts' tokens and the logit bias are inputs of the graph). Any other
call -- training (autograd), ``torch.jit.trace`` (the live previews trace the UNet themselves), a LoRA or IP-Adapter
processor, ControlNet residuals, a GPU or a half-precision UNet -- runs the UNet's own forward, unchanged.

Why, measured on this project's two-core CPU machine (embedded model, 16 images, 20 DDIM steps, guidance 4): a
request runs 1.2x faster through ONNX Runtime than through torch, at one thread and at two (the UNet's call at
batch 32 alone: 91 against ~110 ms on one thread; its fused convolution and attention kernels); two single-thread
processes side by side (the render workers) gain less, 1.1x, as they share the machine's caches and memory. The
outputs differ from torch's in float rounding only (9e-7 on UNet outputs of magnitude 4; images within 2e-5), so
renders differ from plain diffusers' within the project's 2e-3 tolerance, not bit for bit: :meth:`provenance`
records ``onnxruntime:<version>`` among the optimizations, and frame cache keys change with it. The export takes
~1.5 s on the embedded UNet and is kept in :func:`cache_folder` by a hash of the weights (then ~0.2 s).

Sessions are made per process on first use, with the process's torch thread count at that time (a forked render
worker makes its own: ONNX Runtime's thread pools do not survive ``fork``).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import types
import weakref
from pathlib import Path
from typing import Any

import torch

__all__ = ["OnnxUNet", "available", "cache_folder", "version"]

OPSET = 17

#: Largest exported model kept in memory (protobuf's own limit is 2 GiB; SD 1.5's UNet is 3.4 GB in float32).
MAX_BYTES = 1 << 30


def available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (torch's exporter writes with it) can be imported (``pip install
    "latentlab[onnx]"``)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class _Export(torch.nn.Module):
    """The UNet call the graph holds: ``(sample, timestep, text, bias) -> noise prediction``, the bias read by every
    cross-attention layer (:class:`~latentlab.backend.families.unet.InputBiasCrossAttention`)."""

    def __init__(self, unet, proc):
        super().__init__()
        self.unet, self.proc = unet, proc

    def forward(self, sample, timestep, text, bias):
        self.proc.current = bias
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states=text, return_dict=False)[0]


def cache_folder() -> Path:
    """Where exported models are kept: ``$LATENTLAB_CACHE/onnx``, else ``$XDG_CACHE_HOME/latentlab/onnx``, else
    ``~/.cache/latentlab/onnx``."""
    root = os.environ.get("LATENTLAB_CACHE")
    if root:
        return Path(root) / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentlab" / "onnx"


def _key(unet) -> str:
    """A hash of everything the exported graph depends on: every weight's bytes, the config, torch's version."""
    import json

    from latentlab._version import __version__

    h = hashlib.sha256(f"{torch.__version__}|{__version__}|{OPSET}".encode())
    h.update(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    for name, t in unet.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _cached_export(unet, *, fresh: bool = False) -> tuple[bytes, Path | None]:
    """The exported model and the cache file it came from (None when exported now): from the cache folder when an
    export of exactly these weights is there (an export costs ~1.5 s on the embedded UNet, loading it ~0.02 s), unless
    ``fresh``. A folder that cannot be written is no error."""
    from latentlab._files import atomic_write

    path = cache_folder() / f"unet-{_key(unet)}.onnx"
    if not fresh:
        try:
            return path.read_bytes(), path
        except OSError:
            pass
    data = _export(unet)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    except OSError:
        pass
    return data, None


def _export(unet) -> bytes:
    from latentlab.backend.families.unet import InputBiasCrossAttention, _cross_processor

    p = next(unet.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError(f"ONNX Runtime runs a float32 UNet on the CPU here; this one is {p.dtype} on {p.device}")
    plain = _plain_processors()
    odd = {type(m.processor).__name__ for m in _attention(unet) if type(m.processor) not in plain}
    if odd:
        raise ValueError(f"ONNX Runtime here exports diffusers' default attention only; this UNet runs {sorted(odd)}")
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    sample = torch.randn(2, c.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 7, c.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(2, 1, 1, 7)
    buf = io.BytesIO()
    with torch.no_grad(), _cross_processor(unet, InputBiasCrossAttention()) as proc:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on diffusers' shape checks (constant for a trace)
            torch.onnx.export(
                _Export(unet, proc), (sample, torch.tensor(500.0), text, bias), buf,
                input_names=["sample", "timestep", "text", "bias"], output_names=["noise"],
                dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"}, "text": {0: "batch", 1: "tokens"},
                              "bias": {0: "batch", 3: "tokens"}, "noise": {0: "batch", 2: "height", 3: "width"}},
                opset_version=OPSET, dynamo=False)
    data = buf.getvalue()
    if len(data) > MAX_BYTES:
        raise ValueError(f"this UNet exports to {len(data) / 2**30:.1f} GiB of ONNX; ONNX Runtime is for small "
                         "UNets on the CPU here (use a GPU for large models)")
    return data


def _plain_processors() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from latentlab.backend.families.unet import CachedCrossAttention

    return (AttnProcessor2_0, CachedCrossAttention)


def _attention(unet) -> list:
    from latentlab.backend.families.unet import _attention_modules

    return _attention_modules(unet)


def _state(unet) -> tuple[int, int, int]:
    """What changes when the UNet's weights or modules change after the export (a LoRA loaded or fused, training):
    the number of modules, and the sums of the parameters' in-place version counters and addresses."""
    params = list(unet.parameters())
    return sum(1 for _ in unet.modules()), sum(p._version for p in params), sum(p.data_ptr() for p in params)


#: Each optimized UNet's runner, held by the UNet's identity: a copy of the UNet (``copy.deepcopy``, whose weights a
#: user may then change) is not in it, so the copy runs its own forward.
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(unet, *args, **kwargs):
    """The ``forward`` an optimized UNet gets: its runner's, or its own for a UNet that has none (a copy)."""
    runner = _RUNNERS.get(unet)
    if runner is None:
        return type(unet).forward(unet, *args, **kwargs)
    return runner.forward(*args, **kwargs)


class OnnxUNet:
    """A diffusers ``UNet2DConditionModel`` whose ``forward`` runs through ONNX Runtime where the export covers the
    call (see the module notes), and its own ``forward`` otherwise. :meth:`install` puts it in place (an instance
    attribute, so the UNet object, its config and its processors stay what they are; a deep copy of the UNet runs
    its own forward); :meth:`remove` takes it out.

    ``calls`` and ``fallbacks`` count the calls ONNX Runtime ran and those it left to torch.
    """

    def __init__(self, unet):
        from latentlab.backend.families.unet import beyond_text

        why = beyond_text(unet.config)
        if why is not None:
            raise ValueError("ONNX Runtime here covers UNets conditioned by text alone (SD 1.x/2.x and their "
                             f"fine-tunes); this UNet also takes {why}")
        self._unet = weakref.ref(unet)
        self.model, self._cached = _cached_export(unet)
        mods = _attention(unet)
        self._cross = [m for m in mods if getattr(m, "is_cross_attention", False)]
        self._self = [m for m in mods if not getattr(m, "is_cross_attention", False)]
        self._state = _state(unet)
        self._sessions: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self.calls = self.fallbacks = 0

    @property
    def unet(self):
        unet = self._unet()
        if unet is None:
            raise RuntimeError("the UNet this ONNX model was exported from is gone")
        return unet

    @staticmethod
    def of(unet) -> OnnxUNet | None:
        """The runner installed on ``unet`` (None if none is)."""
        return _RUNNERS.get(unet)

    def install(self) -> OnnxUNet:
        unet = self.unet
        _RUNNERS[unet] = self
        unet.forward = types.MethodType(_forward, unet)
        return self

    def remove(self) -> None:
        unet = self.unet
        _RUNNERS.pop(unet, None)
        unet.__dict__.pop("forward", None)

    def session(self):
        """This process's ONNX Runtime session (made on first use, with torch's thread count at that time)."""
        key = (os.getpid(), torch.get_num_threads())
        s = self._sessions.get(key)
        if s is None:
            import onnxruntime as ort

            with self._lock:
                s = self._sessions.get(key)
                if s is None:
                    so = ort.SessionOptions()
                    so.intra_op_num_threads, so.inter_op_num_threads = key[1], 1
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    so.log_severity_level = 3
                    try:
                        s = ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"])
                    except Exception:  # a damaged cache file: export again, once
                        if self._cached is None:
                            raise
                        self.model, self._cached = _cached_export(self.unet, fresh=True)
                        s = ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"])
                    self._sessions = {k: v for k, v in self._sessions.items() if k[0] == os.getpid()} | {key: s}
        return s

    def _bias(self, batch: int, tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """The cross-attention logit bias the current processors mean, ``(batch, 1, 1, tokens)``; None when they
        are not ones the graph holds."""
        from latentlab.backend.families.unet import FusedCrossAttention

        plain = _plain_processors()
        if any(type(m.processor) not in plain for m in self._self) or _state(self.unet) != self._state:
            return None  # a processor, a module or a weight changed since the export
        if all(type(m.processor) in plain for m in self._cross):
            return torch.zeros(batch, 1, 1, tokens)
        procs = {id(m.processor): m.processor for m in self._cross}
        (proc, *others) = procs.values()
        if not others and isinstance(proc, FusedCrossAttention):  # attention interpolation: one bias, every layer
            return proc.bias(batch, tokens, like).float()
        return None

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **extras):
        unet = self.unet
        t = torch.as_tensor(timestep)
        bias = None
        if (not args and all(e is None for e in extras.values()) and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and sample.device.type == "cpu" and sample.dtype == torch.float32
                and encoder_hidden_states.ndim == 3 and (t.ndim == 0 or bool((t == t.flatten()[0]).all()))):
            bias = self._bias(sample.shape[0], encoder_hidden_states.shape[1], sample)
        if bias is None:  # anything else (class labels, masks, residuals, LoRA scales, ...): the UNet's own forward
            self.fallbacks += 1
            return type(unet).forward(unet, sample, timestep, encoder_hidden_states, *args, return_dict=return_dict,
                                      **extras)
        self.calls += 1
        out = self.session().run(None, {
            "sample": sample.detach().contiguous().numpy(),
            "timestep": t.flatten()[0].to(torch.float32).numpy(),
            "text": encoder_hidden_states.detach().float().contiguous().numpy(),
            "bias": bias.contiguous().numpy()})[0]
        noise = torch.from_numpy(out)
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)
