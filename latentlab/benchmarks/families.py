"""Every model family on the same footing: tiny random pipelines of each layout, timed in one run.

Built in-process from configs (no download; random weights time like trained ones): an SD 1.x-layout UNet
pipeline, an SD3 pipeline (two CLIP encoders, no T5), a Flux.1 "dev" pipeline (guidance embedding, T5), a Chroma
pipeline (T5, masked text), a Lumina 2 pipeline (Gemma-2), a Qwen-Image pipeline (Qwen2.5-VL, video VAE) and a
Flux.2 "dev" pipeline (Mistral-3 text encoder, guidance embedding), each with a VAE with f=8 and 64x64 images (SD:
4x8x8 latents; SD3/Flux/Chroma/Lumina 2/Qwen-Image: 16x8x8, Flux, Chroma and Qwen-Image pack them into 16 tokens;
Flux.2: 32x8x8, patchified to 128x4x4). Printed per family, with threads pinned:

- ``generate``: ms per image through :meth:`Lab.generate` (8 steps, guidance 4, batch 8) and the ratio to the
  plain pipeline doing the same images with the same latents in the same run (our overhead), and to SD's time;
- ``invert``: reconstruction error (relative latent RMSE) and ms of flow inversion with Euler at 24 model calls
  and FireFlow at 8 (7 steps + 1), guidance 1 -- the FireFlow claim, measured.

    python -m latentlab.benchmarks.families --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

#: The families benchmarked, in order.
FAMILIES = ("sd", "sd3", "flux", "chroma", "lumina2", "qwenimage", "flux2")


def build(family: str, *, seed: int = 0):
    """A tiny random pipeline of ``family`` (one of :data:`FAMILIES`): 64x64 images, VAE f=8."""
    from latentlab._quiet import quiet_transformers_image_processor_warning

    quiet_transformers_image_processor_warning()
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from latentlab import embedded

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(embedded.model_path() / "tokenizer")
    clip = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                projection_dim=32)
    if family == "flux2":
        return _flux2(tok)
    if family == "lumina2":
        return _lumina2(tok)
    if family == "qwenimage":
        return _qwenimage(tok)
    channels = 4 if family == "sd" else 16
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                                  layers_per_block=1, latent_channels=channels, norm_num_groups=8, sample_size=64,
                                  shift_factor=None if family == "sd" else 0.1159, scaling_factor=0.5,
                                  use_quant_conv=family == "sd", use_post_quant_conv=family == "sd")
    if family == "sd":
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32)
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**clip)), tokenizer=tok, unet=unet,
            scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
            pos_embed_max_size=16)
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=tok,
            text_encoder_3=None, tokenizer_3=None)
    from transformers import T5Config, T5EncoderModel

    if family == "chroma":
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(8, 12, 12), approximator_num_channels=16,
            approximator_hidden_dim=64, approximator_layers=1)
        t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                                     relative_attention_num_buckets=8))
        return diffusers.ChromaPipeline(transformer=transformer, vae=vae, text_encoder=t5, tokenizer=tok,
                                        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                                            shift=3.0, use_dynamic_shifting=True))
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return diffusers.FluxPipeline(transformer=transformer, vae=vae, scheduler=sched,
                                  text_encoder=CLIPTextModel(CLIPTextConfig(**clip)), tokenizer=tok,
                                  text_encoder_2=t5, tokenizer_2=tok)


def _flux2(tok):
    import diffusers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}\n"
                         "{% endfor %}")
    text = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=1024, pad_token_id=49407),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8, head_dim=8)))
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=32,
                                       norm_num_groups=8, sample_size=64)
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=96, timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return diffusers.Flux2Pipeline(scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer)


def _lumina2(tok):
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    text = Gemma2Model(Gemma2Config(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=1024, pad_token_id=49407))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                                  layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                                  shift_factor=0.1159, scaling_factor=0.5, use_quant_conv=False,
                                  use_post_quant_conv=False)
    transformer = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, hidden_size=128, num_layers=4, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=32, axes_dim_rope=(8, 12, 12), axes_lens=(300, 64, 64),
        cap_feat_dim=32)
    return diffusers.Lumina2Pipeline(transformer=transformer, vae=vae, text_encoder=text, tokenizer=tok,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                                         shift=3.0, use_dynamic_shifting=True))


def _qwenimage(tok):
    import diffusers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2)))
    vae = diffusers.AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                           temperal_downsample=[False, True, True])
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                                      shift_terminal=0.02, time_shift_type="exponential")
    return diffusers.QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok,
                                       transformer=transformer)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(family: str, *, images: int = 8, steps: int = 8, repeats: int = 2) -> dict:
    from latentlab.backend import Lab

    pipe = build(family)
    pipe.set_progress_bar_config(disable=True)
    lab = Lab(pipe=pipe, model_id=f"tiny-{family}")
    z = lab.noise(list(range(images)), height=64, width=64)
    cond = lab.encode_prompt("a large red circle on a blue background")
    s = lab.sampling(num_inference_steps=steps, guidance_scale=4.0)
    ours = _best(lambda: lab.generate(z, cond, sampling=s, batch_size=images), repeats)
    kw = lab.adapter.call_kwargs(lab, cond.map(lambda t: t.expand(images, *t.shape[1:])),
                                 lab.negative_conditioning(""), s)
    plain = _best(lambda: pipe(latents=lab.adapter.pack(z), height=64, width=64, num_inference_steps=steps,
                               output_type="pt", **kw), repeats)
    row = {"family": family, "latents": list(z.shape[1:]), "generate_ms_per_image": round(1000 * ours / images, 2),
           "plain_pipeline_ms_per_image": round(1000 * plain / images, 2), "ours_over_plain": round(ours / plain, 3)}
    if family != "sd":
        src = lab.generate(z[:2], cond, sampling=s, output_type="latent", batch_size=2)
        for solver, n in (("euler", 24), ("fireflow", 7)):
            t0 = time.perf_counter()
            inv = lab.invert(src, cond, solver=solver, num_inference_steps=n, batch_size=2)
            err = float((inv.reconstruction - src).norm() / src.norm())
            row[f"invert_{solver}_{n}_steps"] = {"relative_rmse": round(err, 5),
                                                 "ms": round(1000 * (time.perf_counter() - t0), 1)}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.benchmarks.families", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(f, images=args.images, steps=args.steps, repeats=args.repeats) for f in args.families]
    base = next((r["generate_ms_per_image"] for r in rows if r["family"] == "sd"), None)
    for r in rows:
        if base:
            r["over_sd"] = round(r["generate_ms_per_image"] / base, 2)
        print(json.dumps(r))
    print(json.dumps({"threads": torch.get_num_threads(), "images": args.images, "steps": args.steps}))


if __name__ == "__main__":
    main()
