"""Shared test settings and tiny in-process models (no downloads).

Hypothesis deadlines are off: this machine trains models in the background and timing is not what we test.
Profiles: ``ci`` (fixed seed, 50 examples) under CI, ``default`` (100, random) locally, ``thorough`` on request.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from hypothesis import settings

# CI (CI set, as .ci/run does): a fixed seed and no example database, so every run tries the same cases; locally more
# examples and a random seed, to find new failures (HYPOTHESIS_PROFILE=thorough for many more).
settings.register_profile("ci", deadline=None, max_examples=50, derandomize=True, database=None)
settings.register_profile("default", deadline=None, max_examples=100)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))

# A test runner started in the background by a shell without job control inherits SIGINT *ignored*, and so does every
# process it starts: the tests that press Ctrl-C on a child (a render, an export, a training run) would then test
# nothing a user sees (measured: they fail there, the child never stops). A handled signal is reset to the default
# across exec, so restoring Python's own handler here gives every child a terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _tiny_tokenizer(folder):
    """A character-level CLIP tokenizer (no merges) with CLIP's byte alphabet: 514 tokens, built offline."""
    from transformers import CLIPTokenizer

    from latentlab.embedded.train import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16,
                        pad_token="<|endoftext|>")
    return tok


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random Stable Diffusion 1.x-layout pipeline saved as a diffusers folder (16x16 images, f=2)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentlab._quiet import quiet_transformers_image_processor_warning

    quiet_transformers_image_processor_warning()
    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    tok = _tiny_tokenizer(root / "tok-src")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=512,
                                        eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture()
def tiny_lab(tiny_sd_path):
    from latentlab.backend import Lab

    lab = Lab.from_pretrained(tiny_sd_path, device="cpu")
    lab.defaults = lab.defaults.replace(num_inference_steps=3, guidance_scale=3.0)
    return lab


@pytest.fixture(params=["sd", "sdxl"])
def unet_lab(request):
    """The tiny SD and SDXL models (the UNet family), 4 steps at guidance 3."""
    from latentlab.backend import Lab

    path = request.getfixturevalue("tiny_sd_path" if request.param == "sd" else "tiny_sdxl_path")
    lab = Lab.from_pretrained(path, device="cpu")
    lab.defaults = lab.defaults.replace(num_inference_steps=4, guidance_scale=3.0)
    return lab


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny random SDXL-layout pipeline (two text encoders, pooled embeds, time ids): 16x16 images, f=2."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("tiny-sdxl")
    torch.manual_seed(0)
    tok = _tiny_tokenizer(root / "tok-src")
    cfg = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=16)
    text = CLIPTextModel(CLIPTextConfig(**cfg))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                                norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# --- flow-matching transformers (SD3, Flux): tiny random pipelines with 16-channel latents ------------------------

_CLIP = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=16)


def _flow_vae(shift_factor: float, scaling_factor: float):
    """A 16-channel AutoencoderKL of the SD3/Flux kind (shift and scale, no quant convs), f=2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=16, norm_num_groups=8, sample_size=16, shift_factor=shift_factor,
                         scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False)


def _t5():
    """A tiny T5 encoder over the CLIP character vocabulary (the embedded tokenizer stands in for T5's)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=514, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=513, eos_token_id=513))


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline (two CLIP encoders + T5, patch 1, 16-channel VAE f=2) as a folder.
    Load it with ``text_encoder_3=None, tokenizer_3=None`` for the T5-free variant."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("tiny-sd3")
    torch.manual_seed(0)
    tok = _tiny_tokenizer(root / "tok-src")
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_flow_vae(0.0609, 1.5305), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP)), tokenizer_2=tok,
        text_encoder_3=_t5(), tokenizer_3=tok)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _tiny_flux(root, *, guidance_embeds: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = _tiny_tokenizer(root / "tok-src")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=_flow_vae(0.1159, 0.3611), scheduler=sched,
                        text_encoder=CLIPTextModel(CLIPTextConfig(**_CLIP)), tokenizer=tok,
                        text_encoder_2=_t5(), tokenizer_2=tok)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """A tiny random FluxPipeline of the "dev" kind (guidance embedding), 16-channel VAE f=2 (images: x4)."""
    return _tiny_flux(tmp_path_factory.mktemp("tiny-flux"), guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell_path(tmp_path_factory):
    """A tiny random FluxPipeline of the "schnell" kind (no guidance embedding: true CFG above guidance 1)."""
    return _tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), guidance_embeds=False)


def _chat_tokenizer(root):
    """The character-level tokenizer as a fast tokenizer with a chat template (what the Flux.2 pipelines apply)."""
    from transformers import CLIPTokenizerFast

    _tiny_tokenizer(root)
    tok = CLIPTokenizerFast(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=512,
                            pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                         "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}\n{% endfor %}")
    return tok


def _tiny_flux2(root, *, klein: bool):
    """A tiny random Flux.2 pipeline: dev (Mistral-3 text encoder, guidance embedding) or klein (Qwen-3, CFG); an
    8-channel AutoencoderKLFlux2 (f=2) with non-trivial batch-norm statistics, so every normalisation shows."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(0)
    tok = _chat_tokenizer(root / "tok-src")
    text = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, max_position_embeddings=1024, pad_token_id=513)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8,
                             norm_num_groups=8, sample_size=16)
    vae.bn.running_mean.normal_(0, 0.3)
    vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=not klein)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    if klein:
        from diffusers import Flux2KleinPipeline
        from transformers import Qwen3Config, Qwen3ForCausalLM

        encoder = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=27, **text))  # layers 9, 18, 27 are read
        pipe = Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tok,
                                  transformer=transformer)
    else:
        from diffusers import Flux2Pipeline
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        encoder = Mistral3ForConditionalGeneration(Mistral3Config(  # layers 10, 20, 30 are read
            text_config=dict(model_type="mistral", num_hidden_layers=30, **text),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8, head_dim=8)))
        pipe = Flux2Pipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_chroma_path(tmp_path_factory):
    """A tiny random ChromaPipeline (T5 only, masked text tokens, Flux's 16-channel VAE and 2x2 packing)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("tiny-chroma")
    torch.manual_seed(0)
    tok = _tiny_tokenizer(root / "tok-src")
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = ChromaPipeline(transformer=transformer, vae=_flow_vae(0.1159, 0.3611), scheduler=sched,
                          text_encoder=_t5(), tokenizer=tok)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_lumina2_path(tmp_path_factory):
    """A tiny random Lumina2Pipeline (Gemma-2 text encoder, masked text, 16-channel VAE). The pipeline assumes a
    VAE factor of 8, so this VAE has f=8 (images 64 px for 8 x 8 latents)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    root = tmp_path_factory.mktemp("tiny-lumina2")
    torch.manual_seed(0)
    tok = _chat_tokenizer(root / "tok-src")
    text = Gemma2Model(Gemma2Config(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=1024, pad_token_id=513))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    transformer = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, hidden_size=32, num_layers=1,
                                            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                                            multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 64, 64),
                                            cap_feat_dim=16)
    pipe = Lumina2Pipeline(transformer=transformer, vae=vae, text_encoder=text, tokenizer=tok,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_qwenimage_path(tmp_path_factory):
    """A tiny random QwenImagePipeline (Qwen2.5-VL text encoder, a video VAE with per-channel statistics, f=2)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("tiny-qwenimage")
    torch.manual_seed(0)
    tok = _chat_tokenizer(root / "tok-src")
    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=512,
                         eos_token_id=513, pad_token_id=513),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2)))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=torch.randn(16).mul(0.3).tolist(),
                                 latents_std=torch.rand(16).add(0.5).tolist())
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer)
    path = root / "pipe"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_flux2_path(tmp_path_factory):
    """A tiny random Flux2Pipeline (Flux.2 dev layout: 8-channel VAE latents here, 2x2 patchified inside)."""
    return _tiny_flux2(tmp_path_factory.mktemp("tiny-flux2"), klein=False)


@pytest.fixture(scope="session")
def tiny_flux2_klein_path(tmp_path_factory):
    """A tiny random Flux2KleinPipeline (Qwen-3 text encoder, classifier-free guidance)."""
    return _tiny_flux2(tmp_path_factory.mktemp("tiny-flux2-klein"), klein=True)


@pytest.fixture(params=["sd3", "sd3-no-t5", "flux", "flux-schnell", "chroma", "lumina2", "qwenimage", "flux2",
                        "flux2-klein"])
def flow_lab(request):
    """A Lab over each tiny flow pipeline (3 steps by default)."""
    from latentlab.backend import Lab

    kind = request.param
    if kind.startswith("sd3"):
        path = request.getfixturevalue("tiny_sd3_path")
        extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3-no-t5" else {}
    else:
        path = request.getfixturevalue({"flux": "tiny_flux_path", "flux-schnell": "tiny_flux_schnell_path",
                                        "chroma": "tiny_chroma_path", "lumina2": "tiny_lumina2_path",
                                        "qwenimage": "tiny_qwenimage_path",
                                        "flux2": "tiny_flux2_path", "flux2-klein": "tiny_flux2_klein_path"}[kind])
        extra = {}
    lab = Lab.from_pretrained(path, device="cpu", **extra)
    lab.defaults = lab.defaults.replace(num_inference_steps=3)
    lab.kind = kind
    return lab


#: Doctests that generate with a model (several seconds each): run by CI and `pytest`, left out of the quick loop
#: (`-m "not slow"`), like the slow tests. Measured with --durations on this machine.
_SLOW_DOCTESTS = ("latentlab.atlas.shards", "latentlab.backend.lab.Lab.invert", "latentlab.backend.lab.Lab.inpaint",
                  "latentlab.backend.lab.Lab.img2img", "latentlab.atlas.inverse.AtlasMap")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if type(item).__name__ == "DoctestItem" and item.name in _SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)
