"""Train the `toy` base model: a small Wan DiT that really denoises the procedural clips of toy_data.

The `tiny` base model is random, so its previews and targets are unrelated noise. This script trains a
~1M-parameter WanTransformer3DModel by rectified flow matching (DESIGN 3.1) on latent-space clips at
16x16 (128px target) and 8x8 (64px preview) latents, with the tiny T5, tokenizer and VAE of
`tiny_wan_pipeline` frozen, and saves the whole WanPipeline to `--out` (loaded by conf/base/toy.yaml).

    python data_prep/train_toy_base.py --minutes 20 --out assets/toy_base
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NEGATIVE = "low quality, blurry, static"  # conf/base/toy.yaml negative_prompt: the CFG "unconditional"
MAX_LEN = 16  # conf/base/toy.yaml max_sequence_length
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def train_prompts() -> list[str]:
    from surf_train.base.tiny import CORPUS
    from surf_train.pairs import BUILTIN_PROMPTS
    return list(dict.fromkeys([*BUILTIN_PROMPTS, *(p for p in CORPUS if p != NEGATIVE)]))


def build_pipeline(seed: int):
    """tiny_wan_pipeline's frozen text encoder, tokenizer and VAE around a larger fresh transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from surf_train.base.tiny import tiny_wan_pipeline

    tiny = tiny_wan_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        net = WanTransformer3DModel(**TRANSFORMER)
    return WanPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder.eval(), vae=tiny.vae,
                       transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt -> (L, D) embedding, exactly as WanBase.encode_prompt computes it."""
    emb, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_LEN,
                                device=torch.device("cpu"), dtype=torch.float32)
    return {p: e for p, e in zip(prompts, emb)}


def sample_s(n: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    """Half logit-normal, half uniform, then the timestep shift; clamped away from the ends."""
    u = torch.where(torch.rand(n, generator=gen) < 0.5, torch.sigmoid(torch.randn(n, generator=gen)),
                    torch.rand(n, generator=gen))
    return (shift * u / (1 + (shift - 1) * u)).clamp(1e-3, 1 - 1e-3)


def save_atomic(pipe, net_state: dict, out: Path, meta: dict) -> None:
    """save_pretrained into a temp dir, then rename, so a half-written dir never looks complete."""
    live = pipe.transformer.state_dict()
    backup = {k: v.clone() for k, v in live.items()}
    pipe.transformer.load_state_dict(net_state)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "toy_train.json").write_text(json.dumps(meta, indent=1))
    pipe.transformer.load_state_dict(backup)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def evaluate(out: Path, n_seeds: int = 2) -> dict:
    """Denoising MSE vs the best global linear guess, preview-target agreement, prompt adherence."""
    import dataclasses

    from surf_train.base import BaseSpec, load_base_model
    from surf_train.base.toy_data import render_batch
    from surf_train.pairs import BUILTIN_PROMPTS
    from surf_train.sampling import PreviewPlan, pair_sample

    spec = BaseSpec.from_name("toy")
    model = load_base_model(dataclasses.replace(spec, pretrained=str(Path(out).resolve())), "cpu")
    prompts = BUILTIN_PROMPTS
    res: dict = {"denoise": {}}
    cond = model.encode_prompt(prompts)
    gen = torch.Generator().manual_seed(1234)
    for size in (16, 8):
        x0 = torch.cat([render_batch(prompts, [2**31 + 100 * k + i for i in range(len(prompts))], size)
                        for k in range(n_seeds)])  # held-out seeds
        c2 = dataclasses.replace(cond, embeds=cond.embeds.repeat(n_seeds, 1, 1), negative=cond.negative.repeat(n_seeds, 1, 1))
        m, var = x0.mean(), x0.var()
        for s in (0.3, 0.5, 0.8):
            eps = torch.randn(x0.shape, generator=gen)
            xs = (1 - s) * x0 + s * eps
            mse = F.mse_loss(xs - s * model.velocity(xs, s, c2, guidance=1.0), x0).item()
            mse_cfg = F.mse_loss(xs - s * model.velocity(xs, s, c2), x0).item()
            c = (1 - s) * var / ((1 - s) ** 2 * var + s**2)
            trivial = F.mse_loss(m + c * (xs - (1 - s) * m), x0).item()
            res["denoise"][f"{size}x{size} s={s}"] = dict(model=round(mse, 4), model_cfg=round(mse_cfg, 4),
                                                          trivial=round(trivial, 4), ratio=round(mse / trivial, 3))
    plan = PreviewPlan(steps=20, switch=5, shift=spec.shift, preview_size=(8, 8), rule="paper")
    vel = model.velocity_fn(cond)
    pairs = []
    for seed in (10, 11):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), 16, 5, 16, 16, generator=g)
        fresh = torch.randn(len(prompts), 16, 5, 8, 8, generator=g)
        pairs.append(pair_sample(vel, noise, plan, fresh))
    (pa, ta), (pb, tb) = pairs
    da, db = F.avg_pool3d(ta, (1, 2, 2)), F.avg_pool3d(tb, (1, 2, 2))
    res["preview_vs_down_target"] = dict(
        same_seed=round(0.5 * (F.mse_loss(pa, da) + F.mse_loss(pb, db)).item(), 4),
        other_seed=round(0.5 * (F.mse_loss(pa, db) + F.mse_loss(pb, da)).item(), 4),
        target_var=round(0.5 * (ta.var() + tb.var()).item(), 4))
    # prompt adherence: nearest per-prompt mean clip (over 32 training-range seeds) of each target sample
    means = torch.stack([render_batch([p] * 32, list(range(32)), 16).mean(0) for p in prompts])  # (P, C, F, H, W)
    nearest = lambda x: torch.cdist(x.flatten(1), means.flatten(1)).argmin(1)
    truth = torch.arange(len(prompts))
    data = render_batch(prompts, [2**31 + 7 + i for i in range(len(prompts))])
    res["prompt_accuracy"] = dict(samples=round(0.5 * ((nearest(ta) == truth).float().mean() + (nearest(tb) == truth).float().mean()).item(), 3),
                                  data=round((nearest(data) == truth).float().mean().item(), 3), chance=round(1 / len(prompts), 3))
    res["hf_fraction"] = dict(samples=round(_hf(torch.cat([ta, tb])), 3), data=round(_hf(data), 3),
                              noise=round(_hf(torch.randn(data.shape, generator=gen)), 3))
    return res


def _hf(x: torch.Tensor) -> float:
    """Std of what 2x2 area pooling removes relative to the std of x (B, C, F, H, W)."""
    y = x.flatten(0, 2).unsqueeze(1)
    return float((y - F.interpolate(F.avg_pool2d(y, 2), scale_factor=2)).std() / y.std())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "toy_base", help="pipeline directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="clips per 16x16 step (8x8 steps use twice as many)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    ap.add_argument("--shift", type=float, default=2.0, help="timestep shift applied to the training s")
    ap.add_argument("--dropout", type=float, default=0.1, help="probability of the negative prompt (CFG)")
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    ap.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true", help="only measure the pipeline already in --out")
    args = ap.parse_args(argv)
    if args.eval_only:
        torch.set_num_threads(args.threads)
        print(json.dumps(evaluate(args.out), indent=1))
        return

    from tqdm import tqdm

    from surf_train.base.toy_data import render_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pipe = build_pipeline(args.seed)
    net = pipe.transformer.train().requires_grad_(True)
    n_params = sum(p.numel() for p in net.parameters())
    prompts = train_prompts()
    table = encode(pipe, prompts + [NEGATIVE])
    text = torch.stack([table[p] for p in prompts])  # (P, L, D)
    neg = table[NEGATIVE]  # (L, D)
    ema = copy.deepcopy(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    print(f"transformer params {n_params / 1e6:.2f}M, {len(prompts)} prompts, budget {args.minutes} min", flush=True)

    budget, t0 = args.minutes * 60.0, time.time()
    last_save, step, log, avg = t0, 0, [], {}
    bar = tqdm(total=int(budget), unit="s", dynamic_ncols=True, mininterval=5)
    meta = lambda: dict(args={k: str(v) for k, v in vars(args).items()}, params=n_params, steps=step,
                        seconds=round(time.time() - t0, 1), transformer=TRANSFORMER, prompts=prompts, log=log)
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (args.max_steps is not None and step >= args.max_steps):
            break
        # one draw of 2B clips at 16x16: B of them for the 16x16 step, all 2B area-pooled for the 8x8 step
        pidx = torch.randint(len(prompts), (2 * args.batch,), generator=gen)
        seeds = torch.randint(0, 2**31 - 1, (2 * args.batch,), generator=gen).tolist()
        hi = render_batch([prompts[i] for i in pidx], seeds, 16)  # (2B, C, F, 16, 16)
        lo = F.avg_pool3d(hi, (1, 2, 2))  # (2B, C, F, 8, 8), equal to render_batch(.., 8)
        for res, x0, idx in ((16, hi[: args.batch], pidx[: args.batch]), (8, lo, pidx)):
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, elapsed / budget)))
            for g in opt.param_groups:
                g["lr"] = lr
            b = x0.shape[0]
            cond = text[idx].clone()  # (b, L, D)
            drop = torch.rand(b, generator=gen) < args.dropout
            cond[drop] = neg
            s = sample_s(b, gen, args.shift)
            eps = torch.randn(x0.shape, generator=gen)
            sv = s.view(b, 1, 1, 1, 1)
            xs = (1 - sv) * x0 + sv * eps
            v = net(hidden_states=xs, timestep=s * 1000.0, encoder_hidden_states=cond, return_dict=False)[0]
            loss = F.mse_loss(v, eps - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, p in net.state_dict().items():
                    ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
            avg[res] = loss.item() if res not in avg else 0.98 * avg[res] + 0.02 * loss.item()
        if step % 50 == 0:
            log.append(dict(step=step, t=round(time.time() - t0), lr=lr, loss16=round(avg[16], 4),
                            loss8=round(avg[8], 4)))
            print(json.dumps(log[-1]), flush=True)
        bar.set_postfix(step=step, loss16=f"{avg[16]:.4f}", loss8=f"{avg[8]:.4f}", refresh=False)
        bar.n = min(int(time.time() - t0), int(budget))
        bar.update(0)
        if time.time() - last_save > args.save_every * 60:
            save_atomic(pipe, ema, args.out, meta())
            last_save = time.time()
    bar.close()
    log.append(dict(step=step, t=round(time.time() - t0), loss16=round(avg.get(16, float("nan")), 4),
                    loss8=round(avg.get(8, float("nan")), 4)))
    save_atomic(pipe, ema, args.out, meta())
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(json.dumps(evaluate(args.out), indent=1), flush=True)
    print(f"saved {args.out} ({size / 1e6:.1f} MB) after {step} steps, {time.time() - t0:.0f} s; "
          f"final loss 16x16 {avg.get(16, float('nan')):.4f}, 8x8 {avg.get(8, float('nan')):.4f}", flush=True)


if __name__ == "__main__":
    main()
