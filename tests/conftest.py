"""Shared test settings and tiny in-process models (no downloads).

Hypothesis deadlines are off: this machine trains models in the background and timing is not what we test.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=100)
settings.load_profile("default")


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
