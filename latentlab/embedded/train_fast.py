"""Train the embedded few-step model ("embedded-shapes-fast") by distilling the default model.

One responsibility: the committed, seeded recipe that produces ``latentlab/embedded/model-fast`` -- a plain
diffusers ``StableDiffusionPipeline`` folder that generates in 1-4 deterministic DDIM steps without classifier-free
guidance (guidance 4 is baked in). A development tool (like :mod:`latentlab.embedded.train`, whose checkpoint and
loop helpers it uses), not part of the library's import graph.

The method ("coupled-line" distillation, measured against the alternatives in MODEL_CARD.md):

1. ``data``: the teacher (the shipped default model, its own DDIM 20 steps at guidance 4, training prompts only --
   the held-out prompts of the evaluation are never shown to the student) maps noise ``n`` to a latent ``x0``.
2. ``student``: a UNet initialised from the teacher's weights learns, as a v-prediction model, the deterministic
   line through each pair: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e`` with ``e = (n - sqrt(a_T) x0) / sqrt(1 - a_T)``,
   so that the line passes through the noise itself at the first timestep ``T = 999`` (what the pipeline feeds the
   model). A DDIM step from a perfect prediction lands exactly on the line again, so 1, 2, 3 or 4 "trailing" DDIM
   steps all end on the teacher's image, and no fresh noise is ever added (nothing flickers along a morph path).
   It is reflow (Liu et al. 2022) in the variance-preserving parametrisation, with the teacher's guidance distilled in.
3. ``tiny``: an ``AutoencoderTiny`` (TAESD layout) distilled from the default VAE: its decoder reproduces the
   default decoder's image from the same latent (world images' posterior means and the teacher's generated latents;
   ``--fg-weight`` weights the loss on and next to the shape), its encoder the posterior mean, so the pipeline's
   img2img works too. Shipped as the embedded models' preview decoder (``package-preview``:
   ``latentlab/embedded/preview-decoder``), which ``Lab.default`` sets for ``generate_live(..., preview=True)``.
4. ``package``: the diffusers folder (with ``--vae tiny``, the tiny autoencoder as the pipeline's VAE).

::

    python -m latentlab.embedded.train_fast data    --out runs/fast --minutes 35 --threads 2
    python -m latentlab.embedded.train_fast student --out runs/fast --minutes 80 --threads 1   # may run beside
                                                                                  # more data (reloads new shards)
    python -m latentlab.embedded.train_fast package --out runs/fast --vae default
    # the preview decoder (its own run; teacher latents from a data stage's folder):
    python -m latentlab.embedded.train_fast tiny --out runs/tiny --teacher-data runs/fast --pairs 6400 \
        --tiny-channels 32 --tiny-blocks 2,2,2,1 --fg-weight 4 --encoder-share 0.25 --lr 2e-3 --cooldown 0.4 \
        --minutes 80 --threads 1
    python -m latentlab.embedded.train_fast package-preview --out runs/tiny \
        --package-to latentlab/embedded/preview-decoder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from latentlab.embedded import world
from latentlab.embedded.train import _lr, _run, fresh_tmp, sd_pipeline

DEFAULT_MODEL = Path(__file__).parent / "model"
#: The teacher's sampler for the distillation targets (the default model's documented settings).
TEACHER_STEPS, TEACHER_GUIDANCE = 20, 4.0
#: The "trailing" DDIM timesteps the student is used at (1 to 4 steps), sampled more often in training.
GRID = (999, 749, 666, 499, 333, 249)
FIRST_T = 999


def teacher(default_model: Path = DEFAULT_MODEL):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(default_model / "tokenizer")
    text = CLIPTextModel.from_pretrained(default_model / "text_encoder", dtype=torch.float32).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(default_model / "unet", dtype=torch.float32).eval().requires_grad_(False)
    sched = DDIMScheduler.from_pretrained(default_model / "scheduler")
    return tok, text, unet, sched


def embed(tok, text, captions: list[str]) -> torch.Tensor:
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text(ids)[0]


@torch.no_grad()
def teacher_latents(unet, sched, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What ``StableDiffusionPipeline`` computes before decoding (DDIM, ``TEACHER_STEPS``, ``TEACHER_GUIDANCE``)."""
    sched.set_timesteps(TEACHER_STEPS)
    z = noise * sched.init_noise_sigma
    both = torch.cat([uncond.expand(len(z), -1, -1), cond])
    for t in sched.timesteps:
        eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=both).sample.chunk(2)
        z = sched.step(eps_u + TEACHER_GUIDANCE * (eps_c - eps_u), t, z).prev_sample
    return z


def make_data(args) -> None:
    """Shards of ``--shard-size`` (noise, teacher latent, caption) triples in OUT/data, until --minutes or until
    --steps shards exist (resumes by shard)."""
    from safetensors.torch import save_file

    tok, text, unet, sched = teacher()
    uncond = embed(tok, text, [""])
    out = args.out / "data"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    k = len(list(out.glob("shard-*.safetensors")))
    n = args.shard_size
    while (args.minutes is None or time.monotonic() - t0 < args.minutes * 60) and (args.steps is None or k < args.steps):
        b = world.sample(n, seed=args.seed * 1_000_003 + 7_000_000 + k, prompts=world.training_prompts(),
                         drop_size=0.15, drop_background=0.10)
        noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(90_000_000 + k))
        z = torch.cat([teacher_latents(unet, sched, embed(tok, text, b.captions[i:i + 64]), uncond, noise[i:i + 64])
                       for i in range(0, n, 64)])
        tmp = out / f".shard-{k:05d}.tmp"
        save_file({"noise": noise, "x0": z.contiguous()}, tmp, metadata={"captions": json.dumps(b.captions)})
        os.replace(tmp, out / f"shard-{k:05d}.safetensors")
        k += 1
        print(json.dumps({"stage": "data", "shards": k, "elapsed": round(time.monotonic() - t0, 1)}), flush=True)


def load_data(out: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from safetensors import safe_open

    noise, x0, captions = [], [], []
    for f in sorted((out / "data").glob("shard-*.safetensors")):
        with safe_open(f, "pt") as s:
            noise.append(s.get_tensor("noise"))
            x0.append(s.get_tensor("x0"))
            captions += json.loads(s.metadata()["captions"])
    if not noise:
        raise FileNotFoundError(f"no teacher data in {out / 'data'}: run the data stage first")
    return torch.cat(noise), torch.cat(x0), captions


def line(noise: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor):
    """The point at ``t`` of the line through (noise at FIRST_T, x0 at 0), and the v-prediction target there."""
    a_T = alphas[FIRST_T]
    e = (noise - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * e, a.sqrt() * e - (1 - a).sqrt() * x0


def train_student(args) -> None:
    torch.manual_seed(args.seed)
    tok, text, unet, sched = teacher()
    alphas = sched.alphas_cumprod
    data: dict = {"shards": -1, "table": {}}

    def refresh():
        """(Re)load the teacher pairs when the data stage has written more shards (it may run alongside)."""
        shards = len(list((args.out / "data").glob("shard-*.safetensors")))
        if shards == data["shards"]:
            return
        noise, x0, captions = load_data(args.out)
        new = sorted(set(captions) - set(data["table"]))
        for i in range(0, len(new), 128):
            for c, e in zip(new[i:i + 128], embed(tok, text, new[i:i + 128])):
                data["table"][c] = e
        data.update(shards=shards, noise=noise, x0=x0, cond=torch.stack([data["table"][c] for c in captions]),
                    small=torch.tensor([i for i, c in enumerate(captions) if c.startswith("a small ")]))
        print(json.dumps({"stage": "student", "pairs": len(noise)}), flush=True)

    refresh()
    if args.start_from is not None and not (args.out / "student-ckpt" / "meta.json").exists():
        # continue a packaged few-step model (v2: v1's UNet) instead of starting from the teacher's weights
        from diffusers import UNet2DConditionModel

        packaged = UNet2DConditionModel.from_pretrained(args.start_from / "unet", dtype=torch.float32)
        unet.load_state_dict(packaged.state_dict())
        print(json.dumps({"stage": "student", "start_from": str(args.start_from)}), flush=True)
    student = unet.requires_grad_(True).train()
    lr = args.lr or 1e-4
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(student).requires_grad_(False)
    grid = torch.tensor(GRID)

    def step_fn(step, scale):
        if step % 100 == 0:
            refresh()
        g = torch.Generator().manual_seed(20_000_000 + step)
        bsz = args.batch or 64
        idx = torch.randint(len(data["noise"]), (bsz,), generator=g)
        if args.small_share and len(data["small"]):  # over-sample the pairs whose caption names the small size (the weakest row)
            small = data["small"]
            pick = torch.rand(bsz, generator=g) < args.small_share
            idx = torch.where(pick, small[torch.randint(len(small), (bsz,), generator=g)], idx)
        on_grid = torch.rand(bsz, generator=g) < 0.5
        t = torch.where(on_grid, grid[torch.randint(len(grid), (bsz,), generator=g)],
                        torch.randint(0, 1000, (bsz,), generator=g))
        xt, v = line(data["noise"][idx], data["x0"][idx], t, alphas)
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, warmup=100) * scale
        pred = student(xt, t, encoder_hidden_states=data["cond"][idx]).sample
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return loss.item()

    _run("student", args, {"model": student}, opt, step_fn, ema=ema, ema_decay=args.ema or 0.998)


#: The tiny autoencoder's layout before the preview decoder (v1: 32 channels, no block at 64x64; not shipped).
TINY_V1 = {"channels": 32, "blocks": (1, 1, 1, 0)}


def tiny_config(scaling_factor: float, channels: int = 32, blocks: tuple[int, ...] = (1, 1, 1, 0)) -> dict:
    """diffusers' ``AutoencoderTiny`` (TAESD layout) at this size: ``channels`` at every decoder resolution (the
    layout's rule), ``blocks`` residual blocks at 8, 16, 32 and 64 pixels; a 32-channel encoder (img2img only)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(32, 32, 32, 32),
                decoder_block_out_channels=(channels,) * 4, num_encoder_blocks=(1, 1, 1, 1),
                num_decoder_blocks=tuple(blocks), scaling_factor=scaling_factor, force_upcast=False)


def _tiny_layout(args) -> dict:
    """The layout of this run (fixed at its first step in OUT/tiny-layout.json; a resumed run keeps it)."""
    path = args.out / "tiny-layout.json"
    if path.exists():
        return json.loads(path.read_text())
    layout = {"channels": args.tiny_channels, "blocks": [int(b) for b in args.tiny_blocks.split(",")]}
    if len(layout["blocks"]) != 4 or layout["channels"] < 1 or min(layout["blocks"]) < 0:
        raise ValueError(f"`--tiny-blocks` must be four counts >= 0 and `--tiny-channels` >= 1, got "
                         f"{args.tiny_blocks!r} and {args.tiny_channels}")
    path.write_text(json.dumps(layout))
    return layout


@torch.no_grad()
def tiny_data(args, vae, n: int) -> dict[str, torch.Tensor]:
    """The tiny autoencoder's training pairs, made once (OUT/tiny-data.safetensors): world images (colour jitter
    0.06) with the default VAE's posterior means and decodes, and the teacher's latents (``--teacher-data``: a
    folder of the data stage's shards; default OUT) with their decodes -- so a training step runs only the tiny
    model (10x cheaper than running the default VAE every step)."""
    from safetensors.torch import load_file, save_file

    path = args.out / "tiny-data.safetensors"
    if path.exists():
        return load_file(path)
    scaling = float(vae.config.scaling_factor)
    images, means, decodes = [], [], []
    for i in range(0, n, 64):
        b = world.sample(min(64, n - i), seed=args.seed * 1_000_003 + 40_000_000 + i, jitter=0.06)
        x = b.images * 2 - 1
        m = vae.encode(x).latent_dist.mean
        images.append(x.half())
        means.append(m)
        decodes.append(vae.decode(m).sample.half())
    try:
        _, teacher_x0, _ = load_data(args.teacher_data or args.out)
        lat = teacher_x0[:n] / scaling
    except FileNotFoundError:
        lat = torch.zeros(0, 4, 8, 8)
    t_dec = torch.cat([vae.decode(lat[i:i + 64]).sample.half() for i in range(0, len(lat), 64)]) if len(lat) else \
        torch.zeros(0, 3, 64, 64, dtype=torch.float16)
    data = {"images": torch.cat(images), "means": torch.cat(means), "decodes": torch.cat(decodes),
            "teacher_latents": lat, "teacher_decodes": t_dec}
    data = {k: v.contiguous() for k, v in data.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(data, tmp)
    os.replace(tmp, path)
    return data


def foreground_weight(target: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): ``1 + weight`` on and next to the shape (pixels that differ from the
    image's border colour by more than 0.15 in some channel, in [-1, 1] units, grown by one pixel), 1 elsewhere;
    normalised to mean 1 per image. A small shape is a few dozen of 4,096 pixels: unweighted, the loss barely sees
    whether it is drawn right."""
    border = torch.cat([target[..., 0, :], target[..., -1, :], target[..., :, 0], target[..., :, -1]], dim=-1)
    bg = border.median(dim=-1).values[..., None, None]
    fg = ((target - bg).abs().amax(dim=1, keepdim=True) > 0.3).float()  # 0.15 of the [0, 1] range
    fg = F.max_pool2d(fg, 3, stride=1, padding=1)
    w = 1 + weight * fg
    return w / w.mean(dim=(2, 3), keepdim=True)


def train_tiny(args) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL / "vae", dtype=torch.float32).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    layout = _tiny_layout(args)
    data = tiny_data(args, vae, args.pairs)
    print(json.dumps({"stage": "tiny", "pairs": len(data["images"]), "teacher_pairs": len(data["teacher_latents"]),
                      **layout}), flush=True)
    tiny = AutoencoderTiny(**tiny_config(scaling, layout["channels"], layout["blocks"])).train()
    lr = args.lr or 1e-3
    opt = torch.optim.AdamW(tiny.parameters(), lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(tiny).requires_grad_(False)
    n_img, n_teacher = len(data["images"]), len(data["teacher_latents"])

    def step_fn(step, scale):
        g = torch.Generator().manual_seed(30_000_000 + step)
        bsz = args.batch or 32
        i = torch.randint(n_img, (bsz,), generator=g)
        x, lat, target = data["images"][i].float(), data["means"][i], data["decodes"][i].float()
        if n_teacher:  # half the decoder's inputs are what the student generates (teacher latents)
            j = torch.randint(n_teacher, (bsz // 2,), generator=g)
            lat = torch.cat([lat[: bsz - bsz // 2], data["teacher_latents"][j]])
            target = torch.cat([target[: bsz - bsz // 2], data["teacher_decodes"][j].float()])
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, warmup=100) * scale
        rec = tiny.decode(lat).sample
        w = foreground_weight(target, args.fg_weight)
        err = rec - target
        loss = (w * (err.abs() + err.square())).mean()
        k = max(1, round(bsz * args.encoder_share))  # the encoder (img2img only) on a share of the batch
        loss = loss + 0.1 * F.mse_loss(tiny.encode(x[:k]).latents, data["means"][i[:k]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    _run("tiny", args, {"model": tiny}, opt, step_fn, ema=ema, ema_decay=0.999)


def package_preview(args) -> None:
    """The tiny autoencoder alone, as a diffusers ``AutoencoderTiny`` folder (``--package-to``): the embedded
    models' preview decoder (``latentlab/embedded/preview-decoder``)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    scaling = json.loads((DEFAULT_MODEL / "vae" / "config.json").read_text())["scaling_factor"]
    layout = json.loads((args.out / "tiny-layout.json").read_text())
    tiny = AutoencoderTiny(**tiny_config(scaling, layout["channels"], layout["blocks"]))
    tiny.load_state_dict(load_file(args.out / "tiny-ckpt" / "ema.safetensors"))
    dest = args.package_to
    tmp = fresh_tmp(dest)
    tiny.save_pretrained(tmp, safe_serialization=True)
    # diffusers' AutoencoderTiny registers a copy of its decoder channels that its own loader then warns about
    # ("passed ... but are not expected") on every load: dropped from the file (the model registers it again).
    config = json.loads((tmp / "config.json").read_text())
    config.pop("block_out_channels", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    print(f"packaged to {dest}")


def scheduler_config() -> dict:
    """DDIM, trailing timesteps (the first step at t = 999, where the student was trained), v-prediction, and the
    last step returns the prediction itself (``set_alpha_to_one``)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                timestep_spacing="trailing")


def package(args) -> None:
    from diffusers import AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    text = CLIPTextModel.from_pretrained(DEFAULT_MODEL / "text_encoder", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL / "unet", dtype=torch.float32)
    unet.load_state_dict(load_file(args.out / "student-ckpt" / "ema.safetensors"))
    scaling = json.loads((DEFAULT_MODEL / "vae" / "config.json").read_text())["scaling_factor"]
    if args.vae == "tiny":
        layout = json.loads((args.out / "tiny-layout.json").read_text())
        vae = AutoencoderTiny(**tiny_config(scaling, layout["channels"], layout["blocks"]))
        vae.load_state_dict(load_file(args.out / "tiny-ckpt" / "ema.safetensors"))
    else:  # the default model's own VAE (full quality, 40 ms a decode at batch 1)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL / "vae", dtype=torch.float32)
    pipe = sd_pipeline(vae, text, tok, unet, DDIMScheduler(**scheduler_config()))
    dest = args.package_to
    tmp = fresh_tmp(dest)
    pipe.unet.to(torch.float16)  # diffusers upcasts on load; as for the default model
    if args.vae == "default":
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DEFAULT_MODEL / "tokenizer" / name, tmp / "tokenizer" / name)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    print(f"packaged to {dest}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.embedded.train_fast", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["data", "student", "tiny", "package", "package-preview"])
    p.add_argument("--out", type=Path, default=Path("runs/fast"), help="checkpoint folder (resumed if present)")
    p.add_argument("--minutes", type=float, help="stop after this much time (cumulative over resumes)")
    p.add_argument("--steps", type=int, help="stop at this step (cumulative over resumes; data: shards)")
    p.add_argument("--batch", type=int)
    p.add_argument("--shard-size", type=int, default=256, help="data: pairs per shard")
    p.add_argument("--pairs", type=int, default=6144, help="tiny: world images (and teacher latents) made once")
    p.add_argument("--cooldown", type=float, default=0.0,
                   help="decay the learning rate linearly to 0 over this last fraction of --minutes")
    p.add_argument("--lr", type=float)
    p.add_argument("--ema", type=float, help="EMA decay (student: 0.998)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--package-to", type=Path, default=Path(__file__).parent / "model-fast")
    p.add_argument("--start-from", type=Path,
                   help="student: initialise from this packaged few-step model's UNet (when no checkpoint exists)")
    p.add_argument("--small-share", type=float, default=0.0,
                   help="student: share of each batch drawn from pairs whose caption names the small size (v2)")
    p.add_argument("--teacher-data", type=Path, help="tiny: the folder whose data/ holds the teacher shards (default --out)")
    p.add_argument("--tiny-channels", type=int, default=TINY_V1["channels"], help="tiny: decoder channels (new runs)")
    p.add_argument("--tiny-blocks", default=",".join(map(str, TINY_V1["blocks"])),
                   help="tiny: decoder blocks at 8, 16, 32, 64 pixels (new runs)")
    p.add_argument("--fg-weight", type=float, default=0.0, help="tiny: extra loss weight on and next to the shape")
    p.add_argument("--encoder-share", type=float, default=1.0, help="tiny: share of each batch the encoder trains on")
    p.add_argument("--vae", choices=["tiny", "default"], default="tiny",
                   help="package: the distilled tiny autoencoder or the default model's VAE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("data", "student", "tiny") and args.minutes is None and args.steps is None:
        p.error("give --minutes or --steps")
    {"data": make_data, "student": train_student, "tiny": train_tiny, "package": package,
     "package-preview": package_preview}[args.stage](args)


if __name__ == "__main__":
    main()
