"""The generation backend's facade: :class:`Lab`, one object over any supported diffusers pipeline.

One responsibility: what a user holds -- loading a model (the embedded ones by name, a diffusers folder or hub id;
safetensors only) and the public methods, each delegating to the :class:`~latentlab.backend.engine.Engine` it
extends (requests, batching, provenance), the family adapter it was given (:mod:`latentlab.backend.families`), or
the edit and trajectory functions over the engine. Higher layers talk to it through
:class:`latentlab.backend.Backend` so tests can pass a fake.

Shapes come from the model configs (never SD 1.5 constants): latent channels from the denoiser/VAE config, the
VAE factor from ``len(vae.config.block_out_channels) - 1`` downsamplings, the default image size from the config's
sample size times that factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentlab._quiet import no_progress_bars
from latentlab.backend import edits, trajectory
from latentlab.backend.engine import CPU_BATCH_SIZE, Engine, import_diffusers
from latentlab.backend.families import adapter_for
from latentlab.backend.live import LiveGenerator, preview_decode_dtype
from latentlab.backend.records import AttentionMix, Conditioning, Inversion, Trajectory
from latentlab.sampling import Sampling

__all__ = ["CPU_BATCH_SIZE", "Lab"]


def _is_safetensors_folder(path: Path) -> bool:
    return any(path.rglob("*.safetensors"))


class Lab(Engine):
    """A diffusers pipeline plus what latentlab needs to know about it.

    Build one with :meth:`default` (the embedded model, CPU) or :meth:`from_pretrained` (any SD 1.x/2.x, SDXL,
    Turbo, SD3/SD3.5, Flux.1, Chroma, Lumina 2, Qwen-Image or Flux.2 checkpoint, safetensors only). ``defaults`` is the model's complete
    :class:`~latentlab.Sampling`; every method takes ``sampling=`` and/or the diffusers-named overrides and
    resolves them with :meth:`sampling`. Latents are always in the VAE's layout ``(batch, channels, h, w)``
    (4 channels for SD/SDXL, 16 for SD3/Flux.1/Chroma/Lumina 2/Qwen-Image, 32 for Flux.2); token packing and
    patching never leave the backend.

    Batching: ``batch_size`` is the number of items the denoiser (and the VAE) sees per call -- one meaning
    everywhere (``None``: 16 on CPU; on a GPU everything at once, halved on out-of-memory and remembered). With
    ``batch_invariant`` (default on CPU) the last call of a request is padded to exactly ``batch_size`` items, so a
    seed's image is bit-identical whether it is generated alone or among 1,000 others *at that compute batch*
    (manifests and cache keys record it: :meth:`provenance`). An interactive single image passes ``batch_size=1``.

    Examples
    --------
    >>> lab = Lab.default()
    >>> z = lab.noise([1, 2])
    >>> z.shape
    torch.Size([2, 4, 8, 8])
    >>> images = lab.generate(z, lab.encode_prompt(["a red star", "a blue ring"]))
    >>> images.shape, images.dtype
    (torch.Size([2, 3, 64, 64]), torch.float32)
    >>> lab.sampling(guidance_scale=2.0)
    Sampling(num_inference_steps=20, guidance_scale=2.0, negative_prompt='', scheduler='DDIMScheduler')
    >>> lab.family
    'sd'
    """

    def __post_init__(self):
        if self.adapter is None:
            self.adapter = adapter_for(self.pipe)
        super().__post_init__()

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def default(cls, name: str = "embedded-shapes", *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Lab:
        """An embedded model (see ``latentlab/embedded/MODEL_CARD.md``): ``"embedded-shapes"`` (the default UNet
        model), ``"embedded-shapes-flow"`` (its flow-matching twin), both 20 steps at guidance 4, or
        ``"embedded-shapes-fast"`` (distilled from the default: 4 steps, no guidance branch); 64x64 images."""
        from latentlab import embedded

        path = embedded.model_path(name)
        lab = cls._load(path, device=device, dtype=dtype, model_id=f"latentlab/{embedded.resolve(name)}")
        steps, guidance = embedded.SAMPLING[embedded.resolve(name)]
        lab.defaults = lab.defaults.replace(num_inference_steps=steps, guidance_scale=guidance)
        if embedded.preview_decoder_available():  # every embedded model decodes with the one shared VAE
            lab.set_preview_decoder(embedded.preview_decoder_path())
        return lab

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Lab:
        """Load a supported diffusers pipeline (``use_safetensors=True``: never pickles): SD 1.x/2.x, SDXL and their
        Turbo variants, SD3/SD3.5 (without T5: pass ``text_encoder_3=None, tokenizer_3=None``) and Flux.1 (dev or
        schnell). Any other pipeline class is refused with a ``TypeError`` that lists what is supported.

        ``model_id_or_path`` may also name an embedded model (``"embedded-shapes"``, ``"embedded-shapes-flow"``,
        ``"embedded-shapes-fast"``, with or without ``latentlab/``): that is :meth:`default`. ``device`` defaults to CUDA when available,
        else CPU; ``dtype`` to float16 on CUDA, else float32.
        Extra keyword arguments go to ``DiffusionPipeline.from_pretrained`` (e.g. ``variant="fp16"``).
        A local folder is checked first (exists, holds a ``model_index.json`` and safetensors weights);
        ``FileNotFoundError`` says what is missing.
        """
        from latentlab import embedded

        name = embedded.resolve(model_id_or_path)
        if name is not None and not Path(model_id_or_path).exists():
            return cls.default(name, device=device or "cpu", dtype=dtype or torch.float32)
        return cls._load(model_id_or_path, device=device, dtype=dtype, **kwargs)

    @classmethod
    def _load(cls, model_id_or_path: str | Path, *, device=None, dtype=None, model_id: str | None = None,
              **kwargs: Any) -> Lab:
        local = Path(model_id_or_path)
        looks_local = isinstance(model_id_or_path, Path) or local.exists() or str(model_id_or_path).startswith(
            (".", "/", "~"))
        if looks_local:
            local = local.expanduser()
            if not local.is_dir():
                raise FileNotFoundError(f"`model_id_or_path` is not a folder: {local}")
            if not (local / "model_index.json").is_file():
                raise FileNotFoundError(f"`model_id_or_path` has no model_index.json (not a diffusers folder): {local}")
            if not _is_safetensors_folder(local):
                raise FileNotFoundError(f"`model_id_or_path` has no .safetensors weights: {local} (latentlab loads "
                                        "only safetensors, never pickled .bin/.ckpt files; convert them first)")
        diffusers = import_diffusers()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        kwargs.setdefault("use_safetensors", True)
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # failures are reported once, below, not as log lines too
        import transformers

        try:
            with no_progress_bars(diffusers.utils.logging, transformers.utils.logging):
                pipe = diffusers.DiffusionPipeline.from_pretrained(str(local if looks_local else model_id_or_path),
                                                                   dtype=dtype, **kwargs)
        except (OSError, ValueError) as e:
            text = " ".join(str(e).split())
            if "cached" in text or "offline" in text.lower() or "connect" in text.lower():
                why = ("it is not in the local Hugging Face cache and the hub cannot be reached (offline?): download "
                       "it where there is network access, or pass a local folder")
            else:
                why = text[:300]
            raise FileNotFoundError(f"could not load `model_id_or_path` {str(model_id_or_path)!r}: {why}") from e
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        try:
            adapter = adapter_for(pipe)
        except TypeError as e:
            raise TypeError(f"`model_id_or_path` {str(model_id_or_path)!r}: {e}") from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        lab = cls(pipe=pipe, model_id=model_id or str(model_id_or_path), adapter=adapter)
        if "turbo" in str(model_id_or_path).lower():
            lab.defaults = lab.defaults.replace(num_inference_steps=4, guidance_scale=0.0)
        return lab

    def generate_live(self, latents: torch.Tensor, conditioning: Conditioning | AttentionMix, *,
                      sampling: Sampling | None = None, preview: bool = False, **overrides: Any) -> torch.Tensor:
        """Images for a live control (a slider being dragged): each item alone, as fast as it can be exact.

        The same images as ``generate(latents, conditioning, batch_size=1, ...)``, bit for bit, faster where the
        family allows (:class:`~latentlab.backend.live.LiveGenerator`: the UNet family's loop without the pipeline
        call's overhead and, on CPU, a traced UNet; measured 1.30x on the embedded model's 20-step image, one
        thread; an :class:`~latentlab.backend.AttentionMix` too, 1.20x). ``preview=True`` trades fidelity for
        speed: the decode uses the :attr:`preview_decoder` if one is set (the embedded models': a distilled
        ``AutoencoderTiny``), else the VAE, in bfloat16 on a CPU with native bfloat16 (the VAE's pixels within
        ~1e-2; measured 1.39x on the few-step model's 2-step preview, one thread). The denoised latents are the
        final image's either way.

        Examples
        --------
        >>> from latentlab import Lab
        >>> lab = Lab.default()
        >>> cond = lab.encode_prompt("a large red star on a blue background")
        >>> torch.equal(lab.generate_live(lab.noise(5), cond), lab.generate(lab.noise(5), cond, batch_size=1))
        True
        """
        s = self.sampling(sampling, **overrides)
        if not isinstance(preview, bool):
            raise TypeError(f"`preview` must be a bool, got {type(preview).__name__}")
        live = self._live.get(preview)
        if live is None:
            decoder = self._preview_decoder if preview else None
            live = self._live[preview] = LiveGenerator(
                self, trace=self.device.type == "cpu" and not self.compiled, decoder=decoder,
                decode_dtype=preview_decode_dtype(self, decoder) if preview else None)
        return live(latents, conditioning, sampling=s)

    @property
    def preview_decoder(self) -> torch.nn.Module | None:
        """The decoder of previews (``generate_live(..., preview=True)``), or ``None`` for the VAE's own; set it with
        :meth:`set_preview_decoder`. :meth:`default` sets the embedded models' own when one is packaged
        (``latentlab.embedded.preview_decoder_available()``; none is shipped yet: see the few-step model's card)."""
        return self._preview_decoder

    def optimize(self, *, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None,
                 onnx: bool = False) -> Lab:
        """Opt-in speed-ups of the denoiser, recorded in :meth:`provenance` (manifests, frame cache keys):
        ``channels_last`` and ``compile`` (``torch.compile``) as :meth:`Engine.optimize
        <latentlab.backend.engine.Engine.optimize>`, and ``onnx``: the UNet's steps on ONNX Runtime
        (:mod:`latentlab.backend.families.onnx_unet`; SD 1.x/2.x-style UNets in float32 on the CPU, ``pip install
        "latentlab[onnx]"``). Measured on the embedded model, 2 CPU cores: a request 1.2x faster, a morph render
        with worker processes 1.06-1.08x faster than without (BENCHMARKS.md), frames within float rounding of plain
        diffusers'. Checked before any export; returns ``self``.

        Examples
        --------
        >>> lab = Lab.default().optimize(onnx=True)  # doctest: +SKIP
        >>> lab.provenance()["optimizations"]  # doctest: +SKIP
        ['onnxruntime:1.32.0']
        """
        ort = None
        if onnx and not self.onnx:
            from latentlab.backend.families import onnx_unet as ort

            if compile or self.compiled:
                raise ValueError("`onnx=True` and `compile=True` exclude each other (ONNX Runtime runs the UNet)")
            why = self.adapter.onnx_unsupported(self.pipe)
            if why:
                raise ValueError(f"`onnx=True` {why}")
            if self.device.type != "cpu" or self.dtype != torch.float32:
                raise ValueError(f"`onnx=True` is for float32 models on the CPU; this one is {self.dtype} on "
                                 f"{self.device}")
            if not ort.available():
                raise ImportError('`onnx=True` needs ONNX Runtime: pip install "latentlab[onnx]"')
        super().optimize(channels_last=channels_last, compile=compile, compile_mode=compile_mode)
        if ort is not None:
            with self._lock:
                ort.OnnxUNet(self.denoiser).install()
                self._optimizations = (*self._optimizations, f"onnxruntime:{ort.version()}")
                self._pipelines.clear()
                self._live.clear()
        return self

    def set_preview_decoder(self, decoder: Any) -> Lab:
        """Decode previews with a small distilled decoder instead of the VAE's (final images never use it).

        ``decoder`` is diffusers' ``AutoencoderTiny`` (or any VAE-like module: ``decode`` and a ``config`` with the
        latent scaling, as a pipeline's ``vae``) trained for this model's latents -- e.g. TAESD for Stable Diffusion
        1.x/2.x (``AutoencoderTiny.from_pretrained("madebyollin/taesd")``), TAESDXL for SDXL --, a local folder of
        one (safetensors only), or ``None`` for the VAE's own decoder. It is checked with one decode of a zero latent
        of this model's shape, moved to the model's device, and used from the next preview on. Returns the Lab.

        Examples
        --------
        >>> from diffusers import AutoencoderTiny
        >>> from latentlab import Lab
        >>> fast = Lab.default("embedded-shapes-fast")
        >>> untrained = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
        >>> fast.set_preview_decoder(untrained).preview_decoder is untrained  # untrained: the shapes only
        True
        >>> fast.generate_live(fast.noise(0), fast.encode_prompt("a red star"), preview=True).shape
        torch.Size([1, 3, 64, 64])
        >>> fast.set_preview_decoder(None).preview_decoder is None
        True
        """
        if isinstance(decoder, (str, Path)):
            folder = Path(decoder)
            if not (folder / "config.json").is_file() or not _is_safetensors_folder(folder):
                raise FileNotFoundError(f"`decoder` {str(decoder)!r} must be a folder with a config.json and "
                                        "safetensors weights (an AutoencoderTiny saved by diffusers)")
            decoder = import_diffusers().AutoencoderTiny.from_pretrained(folder, use_safetensors=True)
        if decoder is not None:
            if not (isinstance(decoder, torch.nn.Module) and callable(getattr(decoder, "decode", None))
                    and hasattr(getattr(decoder, "config", None), "scaling_factor")):
                raise TypeError("`decoder` must be None, a folder, or a VAE-like module (`decode` and a `config` "
                                f"with `scaling_factor`, e.g. diffusers' AutoencoderTiny), got {type(decoder).__name__}")
            decoder = decoder.to(self.device).eval()
            z = torch.zeros_like(self.noise(0)).to(self.device, next(decoder.parameters()).dtype)
            want = (1, 3, z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor)
            try:
                with torch.no_grad():
                    got = tuple(self.adapter.vae_decode(decoder, z).shape)
            except Exception as e:  # noqa: BLE001 -- any failure here means: not a decoder of these latents
                raise ValueError(f"`decoder` cannot decode this model's latents {tuple(z.shape)}: {e}") from None
            if got != want:
                raise ValueError(f"`decoder` must decode this model's latents {tuple(z.shape)} to images {want}, "
                                 f"got {got}")
        with self._lock:
            self._preview_decoder = decoder
            self._live.pop(True, None)
        return self

    def trajectory(self, latents: torch.Tensor, conditioning: Conditioning, *, sampling: Sampling | None = None,
                   batch_size: int | None = None, on_step=None, **overrides: Any) -> Trajectory:
        """Denoise like :meth:`generate` and record every step's latents and predicted clean latent (x0), optionally
        reporting each step as it ends (``on_step``); see :func:`latentlab.backend.trajectory.trajectory`."""
        with self.pinned():
            return trajectory.trajectory(self, latents, conditioning, sampling=sampling, batch_size=batch_size,
                                         on_step=on_step, **overrides)

    # --- latent edits (composed from diffusers in latentlab.backend.edits) -------------------------------------

    def img2img(self, latents: torch.Tensor, conditioning: Conditioning, *, strength: float = 0.6,
                seed: int | Sequence[int] = 0, sampling: Sampling | None = None, batch_size: int | None = None,
                output_type: str = "pt", **overrides: Any) -> torch.Tensor:
        """Image-to-image as a latent edit; see :func:`latentlab.backend.edits.img2img`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(lab.generate(lab.noise(3), lab.encode_prompt("a large red circle on a blue background")))
        >>> out = lab.img2img(z, lab.encode_prompt("a large red square on a blue background"), strength=0.7, seed=1)
        >>> out.shape
        torch.Size([1, 3, 64, 64])
        """
        with self.pinned():
            return edits.img2img(self, latents, conditioning, strength=strength, seed=seed, sampling=sampling,
                                 batch_size=batch_size, output_type=output_type, **overrides)

    def inpaint(self, latents: torch.Tensor, conditioning: Conditioning, mask: torch.Tensor, *,
                strength: float = 1.0, seed: int | Sequence[int] = 0, image: torch.Tensor | None = None,
                feather: float = 2.0, sampling: Sampling | None = None, batch_size: int | None = None,
                output_type: str = "pt", **overrides: Any) -> torch.Tensor:
        """Latent inpainting: regenerate where ``mask`` is 1; see :func:`latentlab.backend.edits.inpaint`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> z = lab.encode(lab.generate(lab.noise(3), lab.encode_prompt("a large red circle on a blue background")))
        >>> mask = torch.zeros(1, 1, 64, 64); mask[..., :, 32:] = 1      # regenerate the right half
        >>> lab.inpaint(z, lab.encode_prompt("a large red circle on a blue background"), mask, seed=2).shape
        torch.Size([1, 3, 64, 64])
        """
        with self.pinned():
            return edits.inpaint(self, latents, conditioning, mask, strength=strength, seed=seed, image=image,
                                 feather=feather, sampling=sampling, batch_size=batch_size,
                                 output_type=output_type, **overrides)

    def invert(self, latents: torch.Tensor, conditioning: Conditioning, *, solver: str | None = None,
               sampling: Sampling | None = None, batch_size: int | None = None, **overrides: Any) -> Inversion:
        """Invert clean latents to their noise (guidance 1 unless told): DDIM for diffusion models, the flow ODE
        backwards for flow models (``solver`` "euler", "heun" or "fireflow"); see
        :func:`latentlab.backend.edits.invert`.

        Examples
        --------
        >>> lab = Lab.default()
        >>> cond = lab.encode_prompt("a large red circle on a blue background")
        >>> inv = lab.invert(lab.encode(lab.generate(lab.noise(3), cond)), cond)
        >>> inv.noise.shape, inv.psnr.shape
        (torch.Size([1, 4, 8, 8]), torch.Size([1]))
        """
        with self.pinned():
            return edits.invert(self, latents, conditioning, solver=solver, sampling=sampling,
                                batch_size=batch_size, **overrides)
