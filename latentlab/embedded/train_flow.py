"""Train the embedded flow-matching twin: a small SD3-layout transformer on the shapes world.

One responsibility: the committed, seeded recipe that produces ``latentlab/embedded/model-flow`` -- a plain
diffusers ``StableDiffusion3Pipeline`` folder (no T5) that ``DiffusionPipeline.from_pretrained`` loads and generates
from with the pipeline's own call. A development tool (like :mod:`latentlab.embedded.train`, whose checkpoint and
loop helpers it uses), not part of the library's import graph.

The model:

- **VAE**: the default model's (4 latent channels, f=8), shipped with ``shift_factor=0`` -- the same latent space
  as the UNet model, so the two can be compared latent for latent.
- **text**: encoder 1 is the default model's CLIP text tower (fine-tuned with its UNet) with the CLIP model's text
  projection for the pooled vector; encoder 2 is a tiny frozen random CLIP (hidden 16: SD3 needs two). Both frozen.
- **transformer**: ``SD3Transformer2DModel``, patch 1 (64 image tokens at 64x64), hidden 128, 8 joint blocks.
- **objective**: rectified flow (Esser et al. 2024): ``x_s = (1 - s) x0 + s noise``, target ``noise - x0``,
  ``s`` logit-normal(0, 1), 10 % empty captions for classifier-free guidance, EMA.

Training cost: the pipeline appends ``max_sequence_length`` = 256 zero "T5" tokens when no T5 is loaded. Those
tokens are identical (no positions, per-token layers) and stay identical through every block, so 256 of them act
in attention exactly like one token whose logit is raised by ``log 256``. Training uses one such token with that
attention bias (:class:`~latentlab.backend.families.sd3.RepeatedTokenProcessor`, through diffusers' ``set_attn_processor``): 4-5x cheaper per step,
the same function the plain pipeline computes with 256 tokens (checked by ``check_collapse``).

    python -m latentlab.embedded.train_flow train --out runs/flow --minutes 100 --threads 1
    python -m latentlab.embedded.train_flow package --out runs/flow
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from latentlab.backend.families.sd3 import RepeatedTokenProcessor
from latentlab.embedded import world
from latentlab.embedded.train import CAPTION_DROP, _lr, _run, load_weights

#: Zero "T5" tokens StableDiffusion3Pipeline appends without T5 (its ``max_sequence_length`` default).
PAD_TOKENS = 256
DEFAULT_MODEL = Path(__file__).parent / "model"


def transformer_config() -> dict:
    return dict(sample_size=world.RESOLUTION // 8, patch_size=1, in_channels=4, out_channels=4, num_layers=8,
                attention_head_dim=32, num_attention_heads=4, joint_attention_dim=80, caption_projection_dim=128,
                pooled_projection_dim=80, pos_embed_max_size=world.RESOLUTION // 8)


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, shift=1.0)


def make_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**transformer_config())


def text_encoders(default_model: Path = DEFAULT_MODEL):
    """(tokenizer, encoder 1, encoder 2): the default model's text tower + CLIP's projection, and a tiny random one."""
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(default_model / "tokenizer")
    tower = CLIPTextModel.from_pretrained(default_model / "text_encoder", dtype=torch.float32)
    clip = CLIPModel.from_pretrained(default_model / "clip", dtype=torch.float32)
    te1 = CLIPTextModelWithProjection(tower.config)
    te1.text_model.load_state_dict(tower.state_dict())  # transformers 5: CLIPTextModel is the bare tower
    te1.text_projection.load_state_dict(clip.text_projection.state_dict())
    torch.manual_seed(1234)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=tower.config.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    return tok, te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)


@torch.no_grad()
def encode(tok, te1, te2, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline.encode_prompt computes without T5, but with ONE zero pad token (see
    :class:`~latentlab.backend.families.sd3.RepeatedTokenProcessor`): (prompt_embeds (b, 77 + 1, 80), pooled (b, 80))."""
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    o1, o2 = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
    pad = torch.zeros(len(ids), 1, clip.shape[-1])
    return torch.cat([clip, pad], 1), torch.cat([o1.text_embeds, o2.text_embeds], -1)


def null_t5(folder: Path):
    """A T5 slot that contributes exactly nothing: a one-layer ``T5EncoderModel`` whose final RMS norm has weight 0
    (so its output is exactly zero for any prompt: the very tokens StableDiffusion3Pipeline uses without T5), with a
    character-level tokenizer (514 tokens, ~200 KB instead of the 32k-token T5 vocabulary). Why ship it: diffusers
    lists ``text_encoder_3`` as a required component, so a folder without one does not load with a plain
    ``DiffusionPipeline.from_pretrained(folder)``; the model was trained without T5, exactly as with this."""
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    from latentlab.embedded.train import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=PAD_TOKENS, pad_token="<|endoftext|>")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=transformer_config()["joint_attention_dim"], d_kv=8,
                                 d_ff=16, num_layers=1, num_heads=1, relative_attention_num_buckets=8,
                                 pad_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1))
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()
    return t5.eval(), tok


def _vae(default_model: Path = DEFAULT_MODEL):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(default_model / "vae", dtype=torch.float32)
    return vae.eval().requires_grad_(False)


def train(args) -> None:
    torch.manual_seed(args.seed)
    tok, te1, te2 = text_encoders()
    vae = _vae()
    scaling = float(vae.config.scaling_factor)
    model = make_transformer()
    model.set_attn_processor(RepeatedTokenProcessor(PAD_TOKENS))
    lr = args.lr or 3e-4
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ema = copy.deepcopy(model).requires_grad_(False)

    pairs = _load_pairs(args.pairs) if args.pairs else None

    def step_fn(step, scale):
        bsz = args.batch or 64
        g = torch.Generator().manual_seed(20_000_000 + step)
        n_pairs = round(bsz * args.pair_fraction) if pairs is not None else 0
        b = world.sample(bsz - n_pairs, seed=args.seed * 1_000_003 + step, prompts=world.training_prompts(),
                         drop_size=0.15, drop_background=0.10, jitter=args.jitter)
        with torch.no_grad():
            x0 = vae.encode(b.images * 2 - 1).latent_dist.sample(generator=g) * scaling
        noise = torch.randn(x0.shape, generator=g)
        captions = list(b.captions)
        if n_pairs:
            # Reflow (Liu et al. 2022): the teacher's own (noise, image) pairs -- a deterministic coupling, so the
            # target at x_s is (nearly) unique and straight; the teacher's guidance is distilled in with it.
            idx = torch.randint(len(pairs["noise"]), (n_pairs,), generator=g)
            x0 = torch.cat([x0, pairs["x0"][idx]])
            noise = torch.cat([noise, pairs["noise"][idx]])
            captions += [pairs["captions"][i] for i in idx.tolist()]
            keep = torch.cat([torch.ones(bsz - n_pairs, dtype=torch.bool), torch.zeros(n_pairs, dtype=torch.bool)])
        else:
            keep = torch.ones(bsz, dtype=torch.bool)
        # Dropped captions only where the target is the data (a teacher pair's image belongs to its caption).
        captions = ["" if k and float(torch.rand((), generator=g)) < CAPTION_DROP else c for c, k in zip(captions, keep)]
        emb, pooled = encode(tok, te1, te2, captions)
        s = torch.sigmoid(torch.randn(len(x0), generator=g))  # logit-normal(0, 1)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr) * scale
        pred = model(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=emb, pooled_projections=pooled).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    _run("flow", args, {"model": model}, opt, step_fn, ema=ema, ema_decay=0.999)


def _load_pairs(folder: Path) -> dict:
    """The teacher's (noise, latent, caption) shards written by ``train_fast data`` (the UNet default model, DDIM 20
    steps, guidance 4, training prompts only). Both models share the VAE and its scaling, and the flow pipeline
    starts from unit noise as DDIM does, so a pair means the same in both."""
    from latentlab.embedded.train_fast import load_data

    noise, x0, captions = load_data(Path(folder).parent if Path(folder).name == "data" else Path(folder))
    print(json.dumps({"stage": "flow", "teacher_pairs": len(noise)}), flush=True)
    return {"noise": noise, "x0": x0, "captions": captions}


def reset(args) -> None:
    """Copy another run's weights (model and EMA) into a fresh checkpoint in ``--out``: step 0, fresh optimizer --
    to start a second phase (e.g. reflow from teacher pairs) from a trained model with its own schedule."""
    src = Path(args.start_from) / "flow-ckpt"
    ckpt = args.out / "flow-ckpt"
    if ckpt.exists():
        raise FileExistsError(f"{ckpt} exists; reset into an empty folder")
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "ema.safetensors"):
        shutil.copy(src / name, ckpt / name)
    from safetensors.torch import save_file

    save_file({}, ckpt / "optimizer.safetensors")
    (ckpt / "meta.json").write_text(json.dumps({"step": 0, "elapsed": 0.0, "log": [], "started_from": str(src)}))
    print(f"fresh checkpoint in {ckpt} from {src}")


@torch.no_grad()
def check_collapse(transformer, tok, te1, te2) -> float:
    """Max |difference| between the transformer on 256 zero pad tokens (plain processors, as the pipeline runs
    it) and on one pad token with the log-256 bias (training): float rounding only."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    emb, pooled = encode(tok, te1, te2, ["a large red star on a blue background", ""])
    full = torch.cat([emb[:, :-1], torch.zeros(2, PAD_TOKENS, emb.shape[-1])], 1)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0, 200.0])
    transformer.set_attn_processor(JointAttnProcessor2_0())
    a = transformer(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
    transformer.set_attn_processor(RepeatedTokenProcessor(PAD_TOKENS))
    b = transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample
    transformer.set_attn_processor(JointAttnProcessor2_0())
    return float((a - b).abs().max())


def package(args) -> None:
    """The diffusers folder: StableDiffusion3Pipeline without T5 (fp16 transformer/VAE storage, as the default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    tok, te1, te2 = text_encoders()
    vae = _vae()
    vae.register_to_config(shift_factor=0.0)
    model = load_weights(make_transformer(), args.out / "flow-ckpt" / "ema.safetensors")
    model.set_attn_processor(JointAttnProcessor2_0())
    print(json.dumps({"collapse_check_max_abs_diff": check_collapse(model, tok, te1, te2)}))
    t5, t5_tok = null_t5(tmp_tok := args.out / "null-t5-tokenizer")
    pipe = StableDiffusion3Pipeline(transformer=model, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()),
                                    text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=t5_tok)
    del tmp_tok
    dest = args.package_to
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # OpenAI's vocab.json + merges.txt, as the default model ships them
        (tmp / name / "tokenizer.json").unlink(missing_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(DEFAULT_MODEL / "tokenizer" / f, tmp / name / f)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    print(f"packaged to {dest}")


def unpack(args) -> None:
    """The shipped transformer back into a resumable checkpoint in ``--out`` (fresh optimizer, step 0), to continue
    training from the shipped model when the original ``runs/`` folder is gone."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    src = args.package_to
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"no packaged flow model in {src}")
    ckpt = args.out / "flow-ckpt"
    if ckpt.exists():
        raise FileExistsError(f"{ckpt} exists; unpack into an empty folder")
    model = SD3Transformer2DModel.from_pretrained(src / "transformer", dtype=torch.float32)
    ckpt.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, ckpt / "model.safetensors")
    save_file(state, ckpt / "ema.safetensors")
    save_file({}, ckpt / "optimizer.safetensors")
    (ckpt / "meta.json").write_text(json.dumps({"step": 0, "elapsed": 0.0, "log": [], "unpacked_from": str(src)}))
    print(f"unpacked {src} into {ckpt}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.embedded.train_flow", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["train", "package", "unpack", "reset", "check"])
    p.add_argument("--out", type=Path, default=Path("runs/flow"))
    p.add_argument("--minutes", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--cooldown", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=world.JITTER)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=float, default=120.0)
    p.add_argument("--pairs", type=Path, help="teacher pair shards (train_fast data) to reflow from")
    p.add_argument("--pair-fraction", type=float, default=0.75, help="share of each batch from --pairs")
    p.add_argument("--start-from", type=Path, help="reset: the run folder whose weights start the new run")
    p.add_argument("--package-to", type=Path, default=Path(__file__).parent / "model-flow")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "check":
        tok, te1, te2 = text_encoders()
        print(json.dumps({"collapse_check_max_abs_diff": check_collapse(make_transformer(), tok, te1, te2)}))
        return
    if args.stage == "train" and args.minutes is None and args.steps is None:
        p.error("give --minutes or --steps")
    {"train": train, "package": package, "unpack": unpack, "reset": reset}[args.stage](args)


if __name__ == "__main__":
    main()
