"""Train the `toy` base model: a small Wan DiT that generates toy-world clips from their captions.

The world (surf_train/data/toyworld.py) is one flat shape moving over a flat background; the latent is the
exact pixel-unshuffle of surf_train/base/toy_vae.py; the text encoder is a 2-layer T5 trained jointly
with the ~1.3M-parameter WanTransformer3DModel by rectified flow matching (DESIGN 3.1), with training
noise levels drawn through the same timestep shift the sampler uses, at the native 32x32 and at the
16x16 preview size, and 10% of captions dropped to the empty (CFG) prompt.

The whole WanPipeline is saved with `save_pretrained` to --out (conf/base/toy.yaml loads it through
`from_pretrained`, like Wan 2.1). Training state goes to --work every --save-every minutes; rerunning
the same command resumes from it. --eval-only measures a saved pipeline: the fraction of generated
clips whose detected colour, shape and direction match the caption.

The shipped assets/toy_base is two runs (`make toy-base` runs both, about 2 h 20 min on 2 CPU threads):
16000 steps from random weights, then a warm restart from those weights on a fresh 8000-step schedule
stopped at step 1688 (the restart is what taught the axis of motion, see README).

    python data_prep/train_toy_base.py --out runs/toy_stage1 --work runs/toy_stage1_state
    python data_prep/train_toy_base.py --init runs/toy_stage1 --steps 8000 --stop-at 1688 --work runs/toy_stage2_state
    python data_prep/train_toy_base.py --eval-only --n 128     # measure assets/toy_base
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

from surf_train.base.tiny import TOY_WAN_TRANSFORMER as TRANSFORMER  # noqa: E402

NEGATIVE = ""  # conf/base/toy.yaml negative_prompt: the CFG "unconditional" caption
MAX_LEN = 16  # conf/base/toy.yaml max_sequence_length
NATIVE, PREVIEW, FRAMES = 32, 16, 5  # conf/base/toy.yaml native_size / native_frames
SHIFT = 2.0  # conf/base/toy.yaml shift: training noise levels use the sampler's own shift
TEXT = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


def build_pipeline(seed: int):
    """Fresh toy WanPipeline: tokenizer over the caption grammar, T5, pixel-shuffle VAE, transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from surf_train.base.tiny import tiny_tokenizer
    from surf_train.base.toy_vae import PixelShuffleVAE
    from surf_train.data.toyworld import all_captions, render_batch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_tokenizer(corpus=all_captions(), vocab_size=320)
        te = T5EncoderModel(
            T5Config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **TEXT)
        )
        net = WanTransformer3DModel(**TRANSFORMER)
    caps = all_captions()
    x = render_batch(caps * 2, list(range(2 * len(caps))), (NATIVE, NATIVE), FRAMES)
    z = PixelShuffleVAE(stride=2).encode(x).latent_dist.mode()  # (B, 12, F, 16, 16)
    dims = (0, 2, 3, 4)
    vae = PixelShuffleVAE(stride=2, latents_mean=z.mean(dims).tolist(), latents_std=z.std(dims).tolist())
    return WanPipeline(
        tokenizer=tok, text_encoder=te, vae=vae, transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    )


def encode_text(pipe, prompts: list[str]) -> torch.Tensor:
    """(B, L, D) exactly as WanPipeline.encode_prompt (zeros after each caption), with gradients."""
    tok = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tok.attention_mask
    h = pipe.text_encoder(tok.input_ids, mask).last_hidden_state
    return h * mask[..., None]


def sample_s(n: int, gen: torch.Generator) -> torch.Tensor:
    """Half logit-normal, half uniform, mapped through the sampler's shift; clamped away from the ends."""
    u = torch.where(
        torch.rand(n, generator=gen) < 0.5, torch.sigmoid(torch.randn(n, generator=gen)), torch.rand(n, generator=gen)
    )
    return (SHIFT * u / (1 + (SHIFT - 1) * u)).clamp(1e-3, 1 - 1e-3)


def save_pipeline(pipe, ema: dict, out: Path, meta: dict) -> None:
    """save_pretrained with the EMA weights into a temp dir, then rename over --out."""
    saved = copy.deepcopy(pipe)
    saved.transformer.load_state_dict(ema["transformer"])
    saved.text_encoder.load_state_dict(ema["text_encoder"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    saved.save_pretrained(tmp, safe_serialization=True)
    (tmp / "toy_train.json").write_text(json.dumps(meta, indent=1))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def init_from(pipe, pipe_dir: Path) -> None:
    """Load a saved pipeline's transformer and text encoder (safetensors) into `pipe`; its tokenizer must match."""
    from diffusers import WanTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    if not (Path(pipe_dir) / "model_index.json").is_file():
        raise SystemExit(f"--init {pipe_dir}: not a saved pipeline (no model_index.json)")
    if AutoTokenizer.from_pretrained(pipe_dir, subfolder="tokenizer").get_vocab() != pipe.tokenizer.get_vocab():
        raise SystemExit(f"--init {pipe_dir}: its tokenizer differs from this world's captions (world changed?)")
    for name, cls in (("transformer", WanTransformer3DModel), ("text_encoder", T5EncoderModel)):
        getattr(pipe, name).load_state_dict(cls.from_pretrained(pipe_dir, subfolder=name).state_dict())


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@torch.no_grad()
def evaluate(
    pipe_dir: Path, n: int = 128, steps: int = 20, guidance: float | None = None, seed0: int = 10_000, batch: int = 32
) -> dict:
    """Generate n (caption, seed) clips at native size and read them back with the detector."""
    import dataclasses

    from surf_train.base import BaseSpec, load_base_model
    from surf_train.base.sampling import sample
    from surf_train.data.toyworld import Caption, all_captions, detect

    spec = dataclasses.replace(BaseSpec.from_name("toy"), pretrained=str(Path(pipe_dir).resolve()))
    model = load_base_model(spec, "cpu")
    caps = all_captions()
    prompts = [caps[(7 * i) % len(caps)] for i in range(n)]  # every caption before any repeats
    hits = {"colour": 0, "shape": 0, "direction": 0, "axis": 0, "background": 0, "all": 0}
    axis = {"left": "x", "right": "x", "up": "y", "down": "y"}  # motion along the caption's axis, either sign
    for i in range(0, n, batch):
        ps = prompts[i : i + batch]
        gen = torch.Generator().manual_seed(seed0 + i)
        noise = torch.randn(len(ps), spec.channels, FRAMES, NATIVE // 2, NATIVE // 2, generator=gen)
        x = sample(model.velocity_fn(model.encode_prompt(ps), guidance), noise, model.schedule(steps))
        for p, v in zip(ps, model.vae_decode(x)):
            d = detect(v)
            m = d.matches(p)
            for k in m:
                hits[k] += m[k]
            hits["axis"] += axis.get(d.direction) == axis[Caption.parse(p).direction]
            hits["all"] += m["colour"] and m["shape"] and m["direction"]
    return {
        "n": n,
        "steps": steps,
        "guidance": model.spec.guidance if guidance is None else guidance,
        **{k: round(v / n, 3) for k, v in hits.items()},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=16000,
        help="optimizer steps in all (half at 32x32, half at 16x16); the learning-rate schedule follows them",
    )
    ap.add_argument("--stop-at", type=int, default=None, help="stop and save at this step of the --steps schedule")
    ap.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this much wall time")
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "toy_base", help="pipeline directory")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "toy_base", help="resumable training state")
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start a fresh run from the weights of a saved pipeline "
        "(such as assets/toy_base) instead of random ones; ignored when --work holds state to resume",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="clips per 32x32 step; 16x16 steps use twice as many")
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    ap.add_argument("--dropout", type=float, default=0.1, help="probability of the empty caption (for CFG)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between saves")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads; use 1 while anything else runs (2 threads "
        "on a shared 2-core machine ran 10x slower, measured)",
    )
    ap.add_argument("--eval-only", action="store_true", help="only measure the pipeline in --out")
    ap.add_argument("--n", type=int, default=128, help="clips generated by the evaluation")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale for the evaluation (default: toy.yaml)")
    args = ap.parse_args(argv)
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        ap.error(f"--stop-at {args.stop_at} must lie in 1..--steps ({args.steps})")
    torch.set_num_threads(args.threads)
    if args.eval_only:
        print(json.dumps(evaluate(args.out, args.n, guidance=args.guidance)))
        return
    train(args)


def train(args) -> None:
    from tqdm import tqdm

    from surf_train.data.toyworld import all_captions, render_batch

    pipe = build_pipeline(args.seed)
    nets = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    params = [p for m in nets.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, log = 0, 0.0, []
    state_path = args.work / "state.pt"
    init_meta = None  # the --init pipeline's own toy_train.json, kept in ours as its provenance
    if args.init is not None and not state_path.exists():
        init_from(pipe, args.init)
        print(f"initialised from {args.init}", flush=True)
        if (args.init / "toy_train.json").is_file():
            init_meta = json.loads((args.init / "toy_train.json").read_text())
    # cloned one by one: T5's tied embedding appears under two keys and must not be averaged twice
    ema = {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in nets.items()}
    if state_path.exists():  # resume: our own file, still loaded without unpickling arbitrary objects
        st = torch.load(state_path, weights_only=True)
        for k, m in nets.items():
            m.load_state_dict(st["model"][k])
        ema, step, elapsed, log = st["ema"], st["step"], st["elapsed"], st["log"]
        init_meta = st.get("init_meta")
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        print(f"resumed from {state_path} at step {step} ({elapsed / 60:.1f} min)", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for m in nets.values():
        m.train().requires_grad_(True)
    caps = all_captions()
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    print(f"params {n_params}, {len(caps)} captions, {args.steps} steps", flush=True)
    t0, t_start, last_save = time.time() - elapsed, time.time(), time.time()
    avg: dict[int, float] = {}
    meta = lambda: dict(
        args={k: str(v) for k, v in vars(args).items()},
        params=n_params,
        steps=step,
        seconds=round(time.time() - t0, 1),
        transformer=TRANSFORMER,
        text=TEXT,
        log=log[-200:],
        **({} if init_meta is None else {"init": init_meta}),
    )

    def save():
        save_state(
            state_path,
            dict(
                model={k: m.state_dict() for k, m in nets.items()},
                ema=ema,
                step=step,
                elapsed=time.time() - t0,
                log=log,
                opt=opt.state_dict(),
                gen=gen.get_state(),
                init_meta=init_meta,
            ),
        )
        save_pipeline(pipe, ema, args.out, meta())

    mean, std = (torch.tensor(pipe.vae.config[k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    end = args.steps if args.stop_at is None else args.stop_at
    bar = tqdm(total=end, initial=step, unit="step", dynamic_ncols=True, mininterval=10)
    while step < end and (args.minutes is None or time.time() - t_start < 60 * args.minutes):
        # one draw of 2B clips at 32x32: B for the native step, all 2B area-pooled for the 16x16 step
        idx = torch.randint(len(caps), (2 * args.batch,), generator=gen).tolist()
        seeds = torch.randint(0, 2**31 - 1, (2 * args.batch,), generator=gen).tolist()
        prompts = [caps[i] for i in idx]
        px = render_batch(prompts, seeds, (NATIVE, NATIVE), FRAMES)  # 16x16 = area-pooled 32x32 (toyworld)
        hi = pipe.vae.encode(px).latent_dist.mode()
        lo = pipe.vae.encode(F.avg_pool3d(px, (1, 2, 2))).latent_dist.mode()
        for res, z, ps in ((NATIVE, hi[: args.batch], prompts[: args.batch]), (PREVIEW, lo, prompts)):
            frac = min(1.0, step / args.steps)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = lr
            b = z.shape[0]
            x0 = (z - mean) / std
            drop = (torch.rand(b, generator=gen) < args.dropout).tolist()
            text = encode_text(pipe, [NEGATIVE if d else p for p, d in zip(ps, drop)])
            s = sample_s(b, gen)
            eps = torch.randn(x0.shape, generator=gen)
            sv = s.view(b, 1, 1, 1, 1)
            xs = (1 - sv) * x0 + sv * eps
            v = pipe.transformer(hidden_states=xs, timestep=s * 1000.0, encoder_hidden_states=text, return_dict=False)[
                0
            ]
            loss = F.mse_loss(v, eps - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, m in nets.items():
                    for name, p in m.state_dict().items():
                        ema[k][name].mul_(decay).add_(p.detach(), alpha=1 - decay)
            avg[res] = loss.item() if res not in avg else 0.98 * avg[res] + 0.02 * loss.item()
        if step % 100 == 0:
            log.append(
                dict(
                    step=step,
                    t=round(time.time() - t0),
                    lr=lr,
                    loss32=round(avg[NATIVE], 4),
                    loss16=round(avg[PREVIEW], 4),
                )
            )
            print(json.dumps(log[-1]), flush=True)
        bar.set_postfix(step=step, loss32=f"{avg[NATIVE]:.4f}", loss16=f"{avg[PREVIEW]:.4f}", refresh=False)
        bar.update(2)
        if time.time() - last_save > args.save_every * 60:
            save()
            last_save = time.time()
    bar.close()
    save()
    if step < end:
        print(f"stopped at step {step} of {end} after --minutes {args.minutes}; rerun to continue", flush=True)
        return
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"saved {args.out} ({size / 1e6:.1f} MB) after {step} steps, {time.time() - t0:.0f} s", flush=True)
    print(json.dumps(evaluate(args.out, args.n)), flush=True)


if __name__ == "__main__":
    main()
