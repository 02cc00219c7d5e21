"""Train the embedded default model: a miniature Stable Diffusion of the shapes world.

One responsibility: the committed, seeded recipe that produced ``latentlab/embedded/model``. Run by a developer,
once, in stages (each resumable from its last safetensors checkpoint); CI runs a few-step smoke run of every stage.
This module is a development tool, not part of the library's import graph: it owns its own diffusers/transformers
imports so that ``latentlab.backend`` stays the only owner of them at run time.

Stages (``python -m latentlab.embedded.train STAGE --out runs/shapes``):

1. ``tokenizer`` — rebuild OpenAI's CLIP BPE tokenizer (token ids identical to Stable Diffusion's) from the
   ``bpe_simple_vocab_16e6.txt.gz`` file shipped inside the MIT-licensed ``open_clip_torch`` wheel.
2. ``vae`` — ``AutoencoderKL`` f=8, 4 latent channels; L1 + MSE + 1e-6 KL (as SD's VAE, without the GAN/LPIPS
   terms); 32x32 crops aligned to the 8-pixel latent grid (4x cheaper per step, fully convolutional so it
   generalises to 64x64).
3. ``clip`` — a two-tower ``CLIPModel`` trained with the symmetric InfoNCE loss (Radford et al. 2021).
4. ``unet`` — ``UNet2DConditionModel`` with epsilon prediction on SD's scaled-linear betas, min-SNR-5 loss weights
   (Hang et al. 2023), 10 % empty captions for classifier-free guidance, EMA; the text encoder starts from the CLIP
   text tower and is fine-tuned jointly.
5. ``package`` — write the diffusers folder (fp16 safetensors) that ``StableDiffusionPipeline.from_pretrained``
   loads with no latentlab code, plus the CLIP model under ``clip/``.
6. ``unpack`` — the reverse: a packaged folder back into checkpoints in ``--out`` (fresh optimizer), to continue
   training from the shipped model when the original checkpoints are gone.

Every stage is time-boxed (``--minutes``) or step-boxed (``--steps``) and checkpoints every ``--save-every``
seconds; running a stage again resumes it.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from latentlab.embedded import world

CAPTION_DROP = 0.10


# --- tokenizer -----------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    # OpenAI CLIP's reversible byte -> printable-unicode map (simple_tokenizer.py, MIT).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer(bpe_gz: Path, out: Path) -> None:
    """Write vocab.json + merges.txt + tokenizer configs for ``CLIPTokenizer.from_pretrained(out)``."""
    from transformers import CLIPTokenizer

    with gzip.open(bpe_gz) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(out)


def load_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


# --- configs -------------------------------------------------------------------------------------------------------


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 96, 96),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.RESOLUTION,
    )


def clip_configs() -> tuple[dict, dict]:
    text = dict(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=world.RESOLUTION,
        patch_size=8,
        projection_dim=64,
    )
    return text, vision


def unet_config() -> dict:
    return dict(
        sample_size=world.RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def scheduler_config() -> dict:
    # Stable Diffusion 1.x's training schedule.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def make_clip():
    from transformers import CLIPConfig, CLIPModel

    text, vision = clip_configs()
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


# --- checkpoints (safetensors only: no pickles even for our own files) ---------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], opt, meta: dict) -> None:
    """Write a checkpoint folder so that a kill at any moment leaves a complete one: everything goes to
    ``NAME.tmp`` (``meta.json`` last, so a folder with it is complete), the old folder steps aside to ``NAME.old``,
    the new one takes its name, then the old one goes. :func:`load_checkpoint` recovers from any of these states."""
    from safetensors.torch import save_file

    tmp, old = _ckpt_siblings(path)
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed save's leftovers
    tmp.mkdir(parents=True)
    for name, m in modules.items():
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp / f"{name}.safetensors")
    save_file(_optimizer_tensors(opt), tmp / "optimizer.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def _ckpt_siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def recover_checkpoint(path: Path) -> None:
    """After a kill during :func:`save_checkpoint`, leave ``path`` as the newest complete checkpoint and no sibling:
    a finished ``.tmp`` is the newest, then ``path`` itself, then the ``.old`` that stepped aside."""
    tmp, old = _ckpt_siblings(path)
    for cand in (tmp, path, old):
        if (cand / "meta.json").exists():
            if cand != path:
                if path.exists():
                    shutil.rmtree(path)
                os.replace(cand, path)
            break
    for sibling in (tmp, old):
        if sibling.exists():
            shutil.rmtree(sibling)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], opt) -> dict | None:
    from safetensors.torch import load_file

    recover_checkpoint(path)
    if not (path / "meta.json").exists():
        return None
    for name, m in modules.items():
        m.load_state_dict(load_file(path / f"{name}.safetensors"))
    _load_optimizer_tensors(opt, load_file(path / "optimizer.safetensors"))
    return json.loads((path / "meta.json").read_text())


def load_weights(module: torch.nn.Module, file: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(file))
    return module


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


# --- the training loop shared by every stage -----------------------------------------------------------------------


class _Clock:
    def __init__(self, minutes: float | None, steps: int | None, save_every: float):
        self.t0 = time.monotonic()
        self.minutes, self.steps, self.save_every = minutes, steps, save_every
        self.last_save = self.t0

    def done(self, step: int, elapsed_before: float) -> bool:
        if self.steps is not None and step >= self.steps:
            return True
        return self.minutes is not None and self.elapsed(elapsed_before) >= self.minutes * 60

    def elapsed(self, before: float) -> float:
        return before + time.monotonic() - self.t0

    def should_save(self) -> bool:
        if time.monotonic() - self.last_save >= self.save_every:
            self.last_save = time.monotonic()
            return True
        return False


def _run(stage, args, modules, opt, step_fn, *, ema=None, ema_decay=0.999, log_every=25):
    ckpt = args.out / f"{stage}-ckpt"
    all_modules = dict(modules)
    if ema is not None:
        all_modules["ema"] = ema
    meta = load_checkpoint(ckpt, all_modules, opt) or {"step": 0, "elapsed": 0.0, "log": []}
    clock = _Clock(args.minutes, args.steps, args.save_every)
    step = meta["step"]
    running = None
    while not clock.done(step, meta["elapsed"]):
        scale = _cooldown_scale(args, clock.elapsed(meta["elapsed"]))
        loss = step_fn(step, scale)
        step += 1
        if ema is not None:
            ema_update(ema, modules["model"], min(ema_decay, (1 + step) / (10 + step)))
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % log_every == 0:
            entry = {"step": step, "loss": round(running, 5), "elapsed": round(clock.elapsed(meta["elapsed"]), 1)}
            meta["log"].append(entry)
            print(json.dumps({"stage": stage, **entry}), flush=True)
        if clock.should_save():
            save_checkpoint(ckpt, all_modules, opt, {**meta, "step": step, "elapsed": clock.elapsed(meta["elapsed"])})
    meta.update(step=step, elapsed=clock.elapsed(meta["elapsed"]))
    save_checkpoint(ckpt, all_modules, opt, meta)
    return meta


def _lr(step: int, base: float, warmup: int = 200) -> float:
    return base * min(1.0, (step + 1) / warmup)


def _cooldown_scale(args, elapsed: float) -> float:
    """Learning-rate multiplier: 1, then linear decay to 0 over the last ``--cooldown`` fraction of ``--minutes``."""
    if not args.cooldown or args.minutes is None:
        return 1.0
    total = args.minutes * 60
    start = total * (1 - args.cooldown)
    return max(0.0, min(1.0, 1 - (elapsed - start) / (total - start)))


# --- stages --------------------------------------------------------------------------------------------------------


def train_vae(args) -> None:
    torch.manual_seed(args.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr or 1e-3, weight_decay=0.0)
    crop = 32

    def step_fn(step, scale):
        batch = world.sample(args.batch or 32, seed=args.seed * 1_000_003 + step).images
        # Aligned crops: the latent grid of a crop is a sub-grid of the full image's latent grid.
        g = torch.Generator().manual_seed(step)
        oy, ox = (torch.randint(0, (world.RESOLUTION - crop) // 8 + 1, (2,), generator=g) * 8).tolist()
        x = batch[:, :, oy : oy + crop, ox : ox + crop] * 2 - 1
        for group in opt.param_groups:
            group["lr"] = _lr(step, args.lr or 1e-3) * scale
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    ema = copy.deepcopy(vae).requires_grad_(False)
    _run("vae", args, {"model": vae}, opt, step_fn, ema=ema, ema_decay=0.999)


def foreground_weights(images: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (N, 1, H, W): ``1 + weight`` on and next to the shape, 1 on the flat background.

    The shape is small against a flat background, so an unweighted pixel loss is dominated by the background and a
    decoder can score a high PSNR while drawing small shapes as blobs (measured: shape of VAE reconstructions of
    "small" prompts read right only 47 % of the time at 29.7 dB)."""
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    fg = ((images - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()
    fg = F.max_pool2d(fg, 5, 1, 2)  # include the edges just outside the shape
    return 1.0 + weight * fg


def edge_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted L1 between the horizontal and vertical finite differences of ``rec`` and ``x`` (N, 3, H, W): sharp
    corners and thin arms are what tell a small star from a cross or a triangle, and a plain pixel loss is content
    with a blur there (v3)."""
    def grads(t):
        return t[..., :, 1:] - t[..., :, :-1], t[..., 1:, :] - t[..., :-1, :]

    (rx, ry), (xx, xy) = grads(rec), grads(x)
    wx, wy = torch.minimum(w[..., :, 1:], w[..., :, :-1]), torch.minimum(w[..., 1:, :], w[..., :-1, :])
    return (((rx - xx).abs() * wx).sum() + ((ry - xy).abs() * wy).sum()) / ((wx.sum() + wy.sum()) * 3)


class PatchDiscriminator(torch.nn.Module):
    """A small patch discriminator for the decoder's adversarial loss (v3): logits for overlapping ~22-pixel
    patches of a 64x64 image (3 stride-2 convolutions), as in the taming-transformers / Stable Diffusion VAE
    recipe, scaled to this world."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 4, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(c, 2 * c, 4, 2, 1), torch.nn.GroupNorm(8, 2 * c), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * c, 4 * c, 4, 2, 1), torch.nn.GroupNorm(8, 4 * c), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(4 * c, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def train_decoder(args, *, encoder: bool = False) -> None:
    """Fine-tune the VAE decoder (stage ``decoder``: encoder frozen, so the latent space and the UNet are unchanged)
    or the whole VAE (stage ``vae2``: the encoder too, when the latents themselves lose small shapes; the UNet then
    has to be trained further on the new latents). Full 64x64 images, foreground-weighted L1 + MSE, decoding
    posterior samples (the UNet's outputs are never exactly on the encoder's manifold)."""
    torch.manual_seed(args.seed)
    vae = _trained(args, "vae", make_vae())
    if not encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    lr = args.lr or 2e-4
    groups = [{"params": params}]
    disc = None
    if args.adversarial:
        torch.manual_seed(args.seed + 1)
        disc = PatchDiscriminator()
        groups.append({"params": list(disc.parameters()), "betas": (0.5, 0.9)})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    last_layer = vae.decoder.conv_out.weight

    small = [p for p in world.all_prompts() if p[0] == "small"]

    def step_fn(step, scale):
        n = args.batch or 32
        seed = args.seed * 1_000_003 + 5_000_000 + step
        k = round(n * args.small_share)
        x = world.sample(n - k, seed=seed, jitter=args.jitter).images
        if k:  # more small shapes: the size the decoder draws worst (v3)
            x = torch.cat([x, world.sample(k, seed=seed + 900_000_000, prompts=small, jitter=args.jitter).images])
        w = foreground_weights(x, 9.0 if args.fg_weight is None else args.fg_weight)
        g = torch.Generator().manual_seed(20_000_000 + step)
        with torch.set_grad_enabled(encoder):
            post = vae.encode(x * 2 - 1).latent_dist
            z = post.sample(generator=g)
        if args.splice:
            x, z, w = splice(x, z, w, args.splice, g, rectangles=args.splice_rectangles)
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, warmup=50) * scale
        rec = (vae.decode(z).sample + 1) / 2
        err = rec - x
        loss = ((err.abs() + err**2) * w).sum() / (w.sum() * 3)
        if args.edge_weight:
            loss = loss + args.edge_weight * edge_loss(rec, x, w)
        if encoder:
            loss = loss + 1e-6 * post.kl().mean()
        report = loss.item()
        if disc is not None and step >= args.adversarial_start:
            # The adversarial term, weighted adaptively against the reconstruction loss at the decoder's last layer
            # (taming-transformers): a pixel loss alone draws the conditional mean, e.g. a small cross whose latent
            # leaves its arm width uncertain comes out as a rounded four-pointed star; a discriminator asks for a
            # sharp shape instead.
            disc.requires_grad_(False)
            g_loss = -disc(rec).mean()
            g_rec = torch.autograd.grad(loss, last_layer, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            lam = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()
            loss = loss + args.adversarial * lam * g_loss
            disc.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if disc is not None:  # the discriminator's step (hinge loss): real images against this step's decodes
            opt.zero_grad(set_to_none=True)
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
            d_loss.backward()
            opt.step()
        return report

    ema = copy.deepcopy(vae).requires_grad_(False)
    modules = {"model": vae} if disc is None else {"model": vae, "disc": disc}
    _run("vae2" if encoder else "decoder", args, modules, opt, step_fn, ema=ema, ema_decay=0.998)


def splice(x, z, w, fraction: float, g: torch.Generator, f: int = 8, *, rectangles: float = 0.0):
    """Locality training (v2): for ``fraction`` of the batch, join the latents of two images at a random latent
    row or column and ask for the two images joined at the same place. Pixels within half a latent pixel of the
    join get no loss (the decoder may blend there); everywhere else the decoded image must not depend on the latents
    across the join -- exactly what latent inpainting needs (measured in v1: RMS 0.18 of leakage).

    v3: ``rectangles`` of the spliced items instead get another image's latent inside a random latent-aligned
    rectangle (quadrants, centred squares, strips, single latent pixels...): an edit of any region, not only of a
    half, must leave the rest of the image alone. The seam is then the band within half a latent pixel of the
    rectangle's border."""
    n, _, hl, wl = z.shape
    k = round(n * fraction)
    if k == 0:
        return x, z, w
    other = torch.roll(torch.arange(n), 1)
    x, z, w = x.clone(), z.clone(), w.clone()
    for i in range(k):
        j = int(other[i])
        if rectangles and bool(torch.rand((), generator=g) < rectangles):
            y0, x0 = (int(torch.randint(0, d - 1, (), generator=g)) for d in (hl, wl))
            y1 = int(torch.randint(y0 + 1, hl + 1, (), generator=g))
            x1 = int(torch.randint(x0 + 1, wl + 1, (), generator=g))
            lat = torch.zeros(hl, wl, dtype=torch.bool)
            lat[y0:y1, x0:x1] = True
            pix = lat.repeat_interleave(f, 0).repeat_interleave(f, 1)
            grown = F.max_pool2d(pix[None, None].float(), f + 1, 1, f // 2)[0, 0] > 0
            shrunk = -F.max_pool2d(-pix[None, None].float(), f + 1, 1, f // 2)[0, 0] > 0
            seam = grown & ~shrunk
            z[i] = torch.where(lat, z[j], z[i])
            x[i] = torch.where(pix, x[j], x[i])
            w[i] = torch.where(pix, w[j], w[i]) * (~seam)
            continue
        vertical = bool(torch.rand((), generator=g) < 0.5)
        cut = int(torch.randint(1, (wl if vertical else hl), (), generator=g))
        lat = torch.zeros(hl, wl, dtype=torch.bool)
        pix = torch.zeros(hl * f, wl * f, dtype=torch.bool)
        seam = torch.zeros(hl * f, wl * f, dtype=torch.bool)
        if vertical:
            lat[:, cut:] = True; pix[:, cut * f:] = True; seam[:, cut * f - f // 2 : cut * f + f // 2] = True
        else:
            lat[cut:] = True; pix[cut * f:] = True; seam[cut * f - f // 2 : cut * f + f // 2] = True
        z[i] = torch.where(lat, z[j], z[i])
        x[i] = torch.where(pix, x[j], x[i])
        w[i] = torch.where(pix, w[j], w[i]) * (~seam)
    return x, z, w


def latest_vae_stage(out: Path) -> str:
    """The VAE the later stages use: a whole-VAE fine-tune, else a decoder fine-tune, else the first VAE."""
    return next(s for s in ("vae2", "decoder", "vae") if (out / f"{s}-ckpt" / "meta.json").exists() or s == "vae")


def train_clip(args) -> None:
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.tokenizer)
    model = make_clip()
    lr = args.lr or 5e-4
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

    train_prompts = world.training_prompts()

    def step_fn(step, scale):
        n = args.batch or 128
        n_hard = int(n * args.hard_negatives)
        b = world.sample(
            n - n_hard, seed=args.seed * 1_000_003 + step, prompts=train_prompts, drop_size=0.2, drop_background=0.2
        )
        if n_hard:
            # Hard negatives: groups that share size, colour and background and differ only in shape. In random
            # batches two items rarely share colours, so the contrastive loss can be solved without shape.
            g = torch.Generator().manual_seed(77_000_000 + step)
            hard: list[tuple[str, str, str, str]] = []
            while len(hard) < n_hard:
                size, colour, _, bg = train_prompts[int(torch.randint(len(train_prompts), (1,), generator=g))]
                hard += [p for p in train_prompts if (p[0], p[1], p[3]) == (size, colour, bg)]
            hb = world.render_prompts(hard[:n_hard], seed=88_000_000 + step)
            b = world.Batch(torch.cat([b.images, hb.images]), b.captions + hb.captions, b.attributes + hb.attributes)
        ids = tok(b.captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr) * scale
        pixel = (b.images - 0.5) / 0.5
        out = model(input_ids=ids, pixel_values=pixel, return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.loss.item()

    _run("clip", args, {"model": model}, opt, step_fn)


def _trained(args, stage: str, module: torch.nn.Module) -> torch.nn.Module:
    ckpt = args.out / f"{stage}-ckpt"
    name = "ema" if (ckpt / "ema.safetensors").exists() else "model"
    return load_weights(module, ckpt / f"{name}.safetensors")


@torch.no_grad()
def low_noise_ramp(t: torch.Tensor, full: int = 200, zero: int = 400) -> torch.Tensor:
    """1 for timesteps below ``full``, falling linearly to 0 at ``zero``: where caption corruption applies (v2.1)."""
    return ((zero - t.float()) / (zero - full)).clamp(0, 1)


def one_attribute_off(text: str, g: torch.Generator) -> str:
    """The caption with one of its words (size, colour, shape or background) changed to another valid value.

    Training the UNet at low noise levels on such captions, with the true noise as the target, teaches it that
    once an image is mostly formed the image decides and the prompt does not: img2img at a low strength then keeps
    the input's attributes, and the share that takes a new prompt's attributes rises with strength (v2.1).

    >>> one_attribute_off("a red star", torch.Generator().manual_seed(0)) != "a red star"
    True
    """
    words = text.split()
    size = words[1] if words[1] in world.SIZES else None
    rest = words[2:] if size else words[1:]
    colour, shape = rest[0], rest[1]
    bg = rest[4] if len(rest) > 2 else None
    slots = ["colour", "shape"] + (["size"] if size else []) + (["background"] if bg else [])
    slot = slots[int(torch.randint(len(slots), (), generator=g))]
    def other(options, *avoid):
        options = [o for o in options if o not in avoid]
        return options[int(torch.randint(len(options), (), generator=g))]
    if slot == "colour":
        colour = other(world.COLOUR_NAMES, colour, bg)
    elif slot == "shape":
        shape = other(world.SHAPES, shape)
    elif slot == "size":
        size = other(world.SIZE_NAMES, size)
    else:
        bg = other(world.COLOUR_NAMES, bg, colour)
    return world.caption(size, colour, shape, bg)


def latent_stats(vae, n: int = 512, seed: int = 7) -> tuple[float, float]:
    """Mean and std of the VAE posterior means over ``n`` fresh images (sets ``scaling_factor``)."""
    imgs = world.sample(n, seed=seed).images * 2 - 1
    z = torch.cat([vae.encode(imgs[i : i + 64]).latent_dist.mean for i in range(0, n, 64)])
    return z.mean().item(), z.std().item()


def train_unet(args) -> None:
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.tokenizer)
    vae_stage = latest_vae_stage(args.out)
    vae = _trained(args, vae_stage, make_vae()).eval().requires_grad_(False)
    meta_file = args.out / "unet-scaling.json"
    recorded = json.loads(meta_file.read_text()) if meta_file.exists() else None
    def encoder_of(stage: str) -> str:  # the decoder stage freezes the encoder: its latents are the first VAE's
        return "vae" if stage == "decoder" else stage

    if recorded is not None and encoder_of(recorded.get("vae_stage", "vae")) == encoder_of(vae_stage):
        scaling = recorded["scaling_factor"]  # resuming: keep the scaling the UNet has been trained with
    else:
        # First run, or the VAE was fine-tuned since (stage vae2): the latents changed, so set the scaling from the
        # new latents and let the UNet continue on them.
        _, std = latent_stats(vae)
        scaling = 1.0 / std
        meta_file.write_text(json.dumps({"scaling_factor": scaling, "latent_std": std, "vae_stage": vae_stage}))
    clip = _trained(args, "clip", make_clip())
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    unet = make_unet()
    sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    lr = args.lr or 5e-4
    opt = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": lr}, {"params": text.parameters(), "lr": lr * 0.2}], weight_decay=0.01
    )
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    class Joint(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.text = unet, text

    joint = Joint()
    ema = copy.deepcopy(joint).requires_grad_(False)

    small = [p for p in world.training_prompts() if p[0] == "small"]

    def step_fn(step, scale):
        n = args.batch or 64
        k = round(n * args.small_share) if args.small_share else 0
        b = world.sample(
            n - k, seed=args.seed * 1_000_003 + step, prompts=world.training_prompts(),
            drop_size=0.15, drop_background=0.10, jitter=args.jitter,
        )
        if k:  # more small shapes (training prompts only): the size the UNet draws worst (v3)
            more = world.sample(k, seed=args.seed * 1_000_003 + 900_000_000 + step, prompts=small,
                                drop_size=0.15, drop_background=0.10, jitter=args.jitter)
            b = world.Batch(torch.cat([b.images, more.images]), b.captions + more.captions,
                            b.attributes + more.attributes)
        g = torch.Generator().manual_seed(10_000_000 + step)
        ids = tok(b.captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        drop = torch.rand(len(ids), generator=g) < CAPTION_DROP
        ids = torch.where(drop[:, None], empty, ids)
        with torch.no_grad():
            z = vae.encode(b.images * 2 - 1).latent_dist.sample(generator=g) * scaling
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=g)
        if args.corrupt_low_t:
            wrong = torch.rand(len(ids), generator=g) < args.corrupt_low_t * low_noise_ramp(t)
            if wrong.any():
                alt = [one_attribute_off(c, g) for c in b.captions]
                alt_ids = tok(alt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
                ids = torch.where((wrong & ~drop)[:, None], alt_ids, ids)
        eps = torch.randn(z.shape, generator=g)
        zt = sched.add_noise(z, eps, t)
        for i, group in enumerate(opt.param_groups):
            group["lr"] = _lr(step, lr * (1.0 if i == 0 else 0.2)) * scale
        cond = text(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        w = (snr[t].clamp(max=5.0) / snr[t]).view(-1, 1, 1, 1)  # min-SNR-5 for epsilon prediction
        if args.fg_weight:
            # More weight on the latent pixels that hold the shape (small shapes are one or two latent pixels);
            # a positive per-pixel weight leaves each pixel's optimum unchanged, it only re-allocates capacity.
            sp = F.max_pool2d(foreground_weights(b.images, args.fg_weight), 8)
            loss = (w * sp * (pred - eps) ** 2).mean() / sp.mean()
        else:
            loss = (w * (pred - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        return loss.item()

    _run("unet", args, {"model": joint}, opt, step_fn, ema=ema, ema_decay=0.999)


def sd_pipeline(vae, text, tok, unet, scheduler):
    """A ``StableDiffusionPipeline`` of these components, without safety checker or image encoder."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def fresh_tmp(dest: Path) -> Path:
    """An empty path beside ``dest`` to write a package into before it replaces ``dest``."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def package(args) -> None:
    """Assemble the diffusers folder from the trained stages (fp16 where it keeps quality)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    tok = load_tokenizer(args.tokenizer)
    vae = _trained(args, latest_vae_stage(args.out), make_vae())
    scaling = json.loads((args.out / "unet-scaling.json").read_text())["scaling_factor"]
    vae.register_to_config(scaling_factor=round(scaling, 5))
    clip = _trained(args, "clip", make_clip())
    unet = make_unet()
    text = CLIPTextModel(clip.config.text_config)
    state = load_file(args.out / "unet-ckpt" / "ema.safetensors")
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
    pipe = sd_pipeline(vae, text, tok, unet, DDIMScheduler(**scheduler_config()))
    dest = args.package_to
    tmp = fresh_tmp(dest)
    # fp16 storage where diffusers upcasts on load (UNet, VAE: no measurable PSNR change) and for the separate CLIP;
    # the pipeline's text encoder stays float32 because transformers loads it in its stored dtype, and a float16
    # text encoder beside a float32 UNet breaks a plain `StableDiffusionPipeline.from_pretrained(path)`.
    dtype = torch.float16 if args.fp16 else torch.float32
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    clip.to(dtype).save_pretrained(tmp / "clip", safe_serialization=True)
    # How CLIP's images were normalised in training ((x - 0.5) / 0.5 at 64x64): read by latentlab.clip and by
    # transformers' CLIPImageProcessor.
    (tmp / "clip" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"shortest_edge": world.RESOLUTION}, "crop_size": {"height": world.RESOLUTION, "width": world.RESOLUTION},
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "resample": 3,
    }, indent=2) + "\n")
    # Ship the tokenizer as OpenAI's vocab.json + merges.txt (1.5 MB, read by transformers 4 and 5) rather than the
    # 3.6 MB tokenizer.json that transformers 5 also writes.
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(args.tokenizer / name, tmp / "tokenizer" / name)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    print(f"packaged to {dest}")


def unpack(args) -> None:
    """Turn a packaged model folder (``--package-to``, default the shipped one) back into resumable checkpoints in
    ``--out``, so training can continue without the original ``runs/`` folder (fresh optimizer state, step 0)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPTextModel

    src = args.package_to
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"no packaged model in {src}")
    if any((args.out / f"{s}-ckpt").exists() for s in ("vae", "clip", "unet")):
        raise FileExistsError(f"{args.out} already holds checkpoints; unpack into an empty folder")
    vae = AutoencoderKL.from_pretrained(src / "vae", dtype=torch.float32)
    # A candidate folder may leave out the CLIP model it shares with the shipped one (data/candidates/).
    clip = CLIPModel.from_pretrained((src if (src / "clip").is_dir() else Path(__file__).parent / "model") / "clip",
                                     dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(src / "unet", dtype=torch.float32)
    text = CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32)
    joint = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
             **{f"text.{k}": v for k, v in text.state_dict().items()}}
    meta = json.dumps({"step": 0, "elapsed": 0.0, "log": [], "unpacked_from": str(src)})
    for stage, state, ema in (("vae", vae.state_dict(), True), ("clip", clip.state_dict(), False), ("unet", joint, True)):
        d = args.out / f"{stage}-ckpt"
        d.mkdir(parents=True)
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, d / "model.safetensors")
        if ema:
            save_file(tensors, d / "ema.safetensors")
        save_file({}, d / "optimizer.safetensors")
        (d / "meta.json").write_text(meta)
    if args.decoder_step is not None:  # the VAE as a decoder run's state, so `decoder --minutes` continues its schedule
        shutil.copytree(args.out / "vae-ckpt", args.out / "decoder-ckpt")
        (args.out / "decoder-ckpt" / "meta.json").write_text(json.dumps(
            {"step": args.decoder_step, "elapsed": 60.0 * args.decoder_minutes, "log": [], "unpacked_from": str(src)}))
    (args.out / "unet-scaling.json").write_text(json.dumps({"scaling_factor": vae.config.scaling_factor}))
    if not args.tokenizer.exists():
        shutil.copytree(src / "tokenizer", args.tokenizer)
    print(f"unpacked {src} into {args.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentlab.embedded.train", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["tokenizer", "vae", "decoder", "vae2", "clip", "unet", "package", "unpack"])
    p.add_argument("--out", type=Path, default=Path("runs/shapes"), help="checkpoint folder (resumed if present)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: OUT/tokenizer)")
    p.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (tokenizer stage)")
    p.add_argument("--minutes", type=float, help="stop after this much training time (cumulative over resumes)")
    p.add_argument("--steps", type=int, help="stop at this step (cumulative over resumes)")
    p.add_argument("--batch", type=int)
    p.add_argument("--cooldown", type=float, default=0.0,
                   help="decay the learning rate linearly to 0 over this last fraction of --minutes")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hard-negatives", type=float, default=0.5, help="clip: fraction of each batch in shape-only groups")
    p.add_argument("--fg-weight", type=float,
                   help="extra loss weight on and around the shape (decoder/vae2: default 9; unet: default 0)")
    p.add_argument("--jitter", type=float, default=0.0, help="decoder/vae2/unet: per-channel colour jitter (v2: 0.06)")
    p.add_argument("--splice", type=float, default=0.0,
                   help="decoder/vae2: fraction of each batch trained on latents joined from two images (locality)")
    p.add_argument("--splice-rectangles", type=float, default=0.0,
                   help="decoder/vae2: share of the spliced items joined inside a random rectangle instead of at a cut "
                        "(v3 locality: any region)")
    p.add_argument("--small-share", type=float, default=0.0,
                   help="decoder/vae2/unet: share of each batch drawn from small-shape prompts (v3; unet: training "
                        "prompts only)")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="decoder/vae2: weight of an L1 loss on image gradients (sharp small shapes, v3)")
    p.add_argument("--adversarial", type=float, default=0.0,
                   help="decoder/vae2: weight of a patch-discriminator loss (adaptive, as taming-transformers; v3)")
    p.add_argument("--adversarial-start", type=int, default=100,
                   help="decoder/vae2: step at which the adversarial loss starts (the discriminator trains from 0)")
    p.add_argument("--corrupt-low-t", type=float, default=0.0,
                   help="unet: chance of a one-attribute-wrong caption at low noise levels (v2.1: 0.5)")
    p.add_argument("--decoder-step", type=int,
                   help="unpack: also write decoder-ckpt as a decoder run at this step (v2.3: 1518, the v2.2 decoder's)")
    p.add_argument("--decoder-minutes", type=float, default=0.0,
                   help="unpack: the training minutes that decoder run had spent (v2.3: 45)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--package-to", type=Path, default=Path(__file__).parent / "model")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tokenizer = args.tokenizer or args.out / "tokenizer"
    if args.stage == "tokenizer":
        if args.bpe is None:
            p.error("the tokenizer stage needs --bpe PATH/bpe_simple_vocab_16e6.txt.gz (from the open_clip_torch wheel)")
        build_tokenizer(args.bpe, args.tokenizer)
        return
    if args.stage in ("vae", "decoder", "vae2", "clip", "unet") and args.minutes is None and args.steps is None:
        p.error("give --minutes or --steps")
    {"vae": train_vae, "decoder": train_decoder,
     "vae2": lambda a: train_decoder(a, encoder=True), "clip": train_clip, "unet": train_unet, "package": package, "unpack": unpack}[args.stage](args)


if __name__ == "__main__":
    main()
