"""Train-step throughput of the text-to-image DiT: plain diffusers baseline vs the project's path.

One optimizer step (forward + backward + AdamW) on random tensors shaped like the feature cache
(latents 4 x 32 x 32 for 256 px, CLIP-L 77 x 768 or T5-XXL 120 x 4096 text features), so the
number is the model's, not the data loader's (see trainer_e2e.py for that). Per row: img/s,
step time, TFLOP/s from torch.utils.flop_counter over forward + backward, MFU against
--peak-tflops, peak GPU memory.

Rows ("variants"; one base plus +levers, e.g. baseline+nomask+compile):
  fp32          plain diffusers PixArtTransformer2DModel, fp32, all-ones text mask, fused AdamW
  baseline      the same under bf16 autocast (docs/references.md section 4's plain row)
  plain-levers  baseline+nomask+compile (the reference "plain levers": 37% / 32% MFU on an H100)
  project       t2i_recap.models registry + the switches the trainer exposes, stepped the way
                t2i_recap.trainer steps (objective.loss with its per-step device generator, grad clipping)
Levers: nomask (pass no text mask when nothing is padded: lets SDPA take its flash kernel; with
--caption-tokens the captions ARE padded and nomask attends to the padding: a speed row only),
mask (force the all-ones mask), compile, max-autotune (compile mode), cudagraphs (compile mode
reduce-overhead), ckpt (gradient checkpointing), foreach (AdamW without the fused kernel).

  python benchmarks/train_step.py --sizes paper --device cuda          # on an H100
  python benchmarks/train_step.py --sizes tiny --device cpu --steps 3  # smoke test, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (H100_BF16_DENSE_TFLOPS, add_output_args, count_flops, free_memory, is_oom,  # noqa: E402
                    median, peak_memory_gib, pick_device, report, reset_peak_memory, synchronize, time_repeats)

# DiT sizes (Peebles & Xie, Table 1): name -> (layers, heads, head_dim); the baseline builds its model
# from these directly, so it does not depend on the project's registry.
DIT = {"S": (12, 6, 64), "B": (12, 12, 64), "L": (24, 16, 64), "XL": (28, 16, 72), "tiny": (4, 4, 32)}
TEXTS = {"clip-l": (77, 768), "t5-xxl": (120, 4096), "clip-tiny": (77, 64), "t5-tiny": (120, 128)}
SIZES = {
    # 256 px through an 8x VAE = 32 x 32 x 4 latents (the paper's setting).
    "paper": {"models": ["DiT-B/4", "DiT-B/2", "DiT-XL/2"], "texts": ["clip-l", "t5-xxl"], "latent": 32},
    "tiny": {"models": ["DiT-tiny/2"], "texts": ["clip-tiny", "t5-tiny"], "latent": 8},
}
# Batches near the reference measurements: B/4 at 512, XL/2 at 64 (bf16 baseline OOMs at 128).
DEFAULT_BATCH = {"DiT-B/4": 512, "DiT-B/2": 256, "DiT-XL/2": 64, "DiT-L/2": 96}
BASES = ("fp32", "baseline", "project")
LEVERS = ("nomask", "mask", "compile", "max-autotune", "cudagraphs", "ckpt", "foreach")
ALIASES = {"plain-levers": "baseline+nomask+compile"}
DEFAULT_VARIANTS = ["baseline", "plain-levers", "project"]
LATENT_CHANNELS = 4


@dataclasses.dataclass
class Variant:
    name: str
    base: str
    levers: set[str]

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        parts = ALIASES.get(spec, spec).split("+")
        base, levers = parts[0], set(parts[1:])
        if base not in BASES or not levers <= set(LEVERS):
            raise SystemExit(f"variant {spec!r}: expected BASE[+LEVER...] with BASE in {BASES}, LEVER in {LEVERS} "
                             f"(or one of {sorted(ALIASES)})")
        return cls(spec, base, levers)


@dataclasses.dataclass
class Case:
    model: str
    text: str
    latent: int
    batch: int
    caption_tokens: int | None = None  # real tokens per caption (the rest padding); None = no padding

    @property
    def text_shape(self) -> tuple[int, int]:
        return TEXTS[self.text]


def parse_model(name: str) -> tuple[int, int, int, int]:
    """"DiT-XL/2" -> (layers, heads, head_dim, patch)."""
    try:
        size, patch = name.removeprefix("DiT-").split("/")
        return (*DIT[size], int(patch))
    except (KeyError, ValueError):
        raise SystemExit(f"unknown model {name!r}; known sizes {sorted(DIT)} as DiT-SIZE/PATCH") from None


def plain_model(case: Case):
    """diffusers' PixArtTransformer2DModel configured as the DiT size, with no project code involved."""
    from diffusers import PixArtTransformer2DModel

    layers, heads, head_dim, patch = parse_model(case.model)
    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=layers, cross_attention_dim=heads * head_dim,
        sample_size=case.latent, patch_size=patch, caption_channels=case.text_shape[1],
        norm_num_groups=32, use_additional_conditions=False)


def project_model(case: Case, levers: set[str], compile_ok: bool):
    """The registry's model with the switches t2i_recap's ModelConfig exposes (read at run time, so
    a lever the trainer grows later is picked up here by name)."""
    from t2i_recap.models import ModelConfig, build_model

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {"name": case.model}
    if "compile" in fields:  # the trainer's switch; applied below, after FLOP counting on the eager model
        kwargs["compile"] = compile_ok
    if "gradient_checkpointing" in fields:
        kwargs["gradient_checkpointing"] = "ckpt" in levers
    cfg = ModelConfig(**kwargs)
    model = build_model(cfg, latent_channels=LATENT_CHANNELS, latent_size=case.latent,
                        caption_channels=case.text_shape[1])
    return model, cfg


def project_optimizer(params, device: torch.device, fused: bool | None):
    """AdamW as the trainer builds it (OptimConfig defaults; `fused` set only to force the lever)."""
    from t2i_recap.trainer import OptimConfig

    o = OptimConfig() if fused is None else OptimConfig(fused=fused)
    return torch.optim.AdamW(params, **o.adamw_kwargs(device)), o


def inputs(case: Case, device: torch.device) -> dict:
    """Random tensors shaped like one cached batch (latent sample already drawn, text features, mask).

    The mask is all ones unless `caption_tokens` is set: then each caption has between 3/4 of it
    and all of it real tokens, right-padded as CLIP and T5 tokenizers pad."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, (tokens, width) = case.batch, case.text_shape
    x0 = torch.randn(n, LATENT_CHANNELS, case.latent, case.latent, generator=g)
    emb = torch.randn(n, tokens, width, generator=g)
    mask = torch.ones(n, tokens)
    if case.caption_tokens:
        k = min(case.caption_tokens, tokens)
        lengths = torch.randint(max(1, k - k // 4), k + 1, (n,), generator=g)
        mask = (torch.arange(tokens).view(1, -1) < lengths.view(-1, 1)).float()
    return {"x0": x0.to(device), "emb": emb.to(device), "mask": mask.to(device)}


def make_step(model, opt, batch: dict, device: torch.device, *, autocast: bool, use_mask: bool,
              objective=None, clip: float = 0.0, trim: Callable | None = None) -> Callable[[], torch.Tensor]:
    """One optimizer step. Without `objective` the rectified-flow loss is inlined with noise drawn on
    the device (the baseline); with it, the project's objective.loss runs as the trainer calls it.
    `trim(emb, mask)` runs every step on a CPU copy of the mask, as the trainer trims text padding
    on the loader's CPU masks; the objective's generator is made per step as the trainer makes it."""
    x0, emb_all, mask_all = batch["x0"], batch["emb"], batch["mask"]
    mask_cpu = mask_all.cpu()
    steps = [0]
    dtype = torch.bfloat16 if autocast else torch.float32

    def model_fn(x, t, **cond):
        return model(x, timestep=t, added_cond_kwargs=None, return_dict=False, **cond)[0]

    def step() -> torch.Tensor:
        if trim is not None:
            emb, mask = trim(emb_all, mask_cpu)
            mask = None if mask is None else mask.to(device)
        else:
            emb, mask = emb_all, mask_all
        mask = mask if use_mask else None
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            if objective is not None:
                from t2i_recap.trainer import step_generator

                gen = step_generator(1, 0, steps[0], 0, device=device)
                steps[0] += 1
                loss = objective.loss(model_fn, x0, gen, encoder_hidden_states=emb, encoder_attention_mask=mask)
            else:
                t = torch.rand(x0.shape[0], device=device)
                noise = torch.randn_like(x0)
                tb = t.view(-1, 1, 1, 1)
                pred = model_fn((1 - tb) * x0 + tb * noise, t * 1000.0, encoder_hidden_states=emb,
                                encoder_attention_mask=mask)
                loss = F.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def compile_mode(levers: set[str]) -> str | None:
    if "cudagraphs" in levers:
        return "reduce-overhead"
    if "max-autotune" in levers:
        return "max-autotune-no-cudagraphs"
    return None


def build_row(case: Case, variant: Variant, device: torch.device, args) -> tuple[Callable, dict, set[str]]:
    """Model, optimizer and step function of one row; returns (step, info, levers actually applied)."""
    levers = set(variant.levers)
    want_compile = bool(levers & {"compile", "max-autotune", "cudagraphs"})
    compile_ok = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    amp_ok = args.autocast == "on" or (args.autocast == "auto" and device.type == "cuda")
    fused = device.type == "cuda" and "foreach" not in levers  # fused AdamW: one kernel for all params
    if variant.base == "project":
        model, cfg = project_model(case, levers, compile_ok)
        want_compile = want_compile or bool(getattr(cfg, "compile", False))
        autocast = mixed_precision() == "bf16" and amp_ok
        # The trainer passes the text mask unless its config says otherwise; "nomask" forces the lever.
        use_mask = "nomask" not in levers and ("mask" in levers or trainer_passes_mask())
        model = model.to(device).train()
        opt, ocfg = project_optimizer(model.parameters(), device, None if "foreach" not in levers else False)
        fused = bool(opt.defaults.get("fused"))
        from t2i_recap import mixing
        from t2i_recap.objectives import ObjectiveConfig, build_objective

        objective, clip = build_objective(ObjectiveConfig()), ocfg.max_grad_norm
        trim = getattr(mixing, "trim_padding", None)  # the trainer drops all-padding text columns, if it can
    else:
        model = plain_model(case).to(device).train()
        autocast, use_mask = variant.base == "baseline" and amp_ok, "nomask" not in levers
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused or None)
        objective, clip, trim = None, 0.0, None
    batch = inputs(case, device)
    step = make_step(model, opt, batch, device, autocast=autocast, use_mask=use_mask, objective=objective, clip=clip,
                     trim=trim)
    flops = count_flops(step)  # eager and un-checkpointed: model FLOPs, the numerator of MFU
    if variant.base == "project":
        from t2i_recap.models import configure_model

        configure_model(model, cfg)  # runtime switches (checkpointing, attention kernel), as the trainer does
    elif "ckpt" in levers:
        model.enable_gradient_checkpointing()
    if autocast:
        precision = "bf16-autocast"
    else:
        precision = "fp32" if variant.base == "fp32" or amp_ok else "fp32 (autocast off on CPU)"
    # The project's trim passes no mask when nothing is padded (all-ones here unless --caption-tokens).
    mask_label = ("mask" if case.caption_tokens else "nomask (all-ones dropped)") if trim is not None else "mask"
    applied = {precision, mask_label if use_mask else "nomask",
               "fused-adamw" if fused else "foreach-adamw"}
    if "ckpt" in levers:
        applied.add("ckpt")
    if trim is not None:
        applied.add("trim-padding")
    if want_compile and compile_ok:
        mode = compile_mode(levers)
        compiled = torch.compile(model, mode=mode)
        step = make_step(compiled, opt, batch, device, autocast=autocast, use_mask=use_mask, objective=objective,
                         clip=clip, trim=trim)
        applied.add(f"compile({mode})" if mode else "compile")
    elif want_compile:
        applied.add("compile skipped (CPU; --compile on forces it)")
    info = {"flops": flops, "params": sum(p.numel() for p in model.parameters())}
    return step, info, applied


def mixed_precision() -> str:
    from t2i_recap.trainer import TrainerConfig

    return TrainerConfig().mixed_precision


def trainer_passes_mask() -> bool:
    """True unless the trainer grew a switch that drops an all-ones text mask (looked up by name)."""
    from t2i_recap.models import ModelConfig
    from t2i_recap.trainer import TrainerConfig

    for cls in (ModelConfig, TrainerConfig):
        for f in dataclasses.fields(cls):
            if "mask" in f.name and isinstance(f.default, bool):
                return not f.default if ("drop" in f.name or "skip" in f.name) else f.default
    return True


def run_row(case: Case, variant: Variant, device: torch.device, args) -> dict:
    text = f"{case.text} {case.text_shape[0]}x{case.text_shape[1]}"
    if case.caption_tokens:
        text += f", <={min(case.caption_tokens, case.text_shape[0])} real"
    row = {"model": case.model, "text": text,
           "variant": variant.name, "batch": case.batch}
    free_memory(device)
    reset_peak_memory(device)
    try:
        step, info, applied = build_row(case, variant, device, args)
        times = time_repeats(step, device=device, warmup=args.warmup, repeats=args.steps)
        synchronize(device)
    except Exception as exc:  # noqa: BLE001 - one failing row (OOM, compile error) must not end the table
        if not is_oom(exc) and not args.keep_going:
            raise
        row["levers"] = "out of memory" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        free_memory(device)
        return row
    sec = median(times)
    tflops = info["flops"] / sec / 1e12
    row.update({"levers": ", ".join(sorted(applied)), "img/s": case.batch / sec, "step ms": sec * 1e3,
                "TFLOP/s": tflops, "MFU %": 100 * tflops / args.peak_tflops, "peak GiB": peak_memory_gib(device),
                "GFLOP/img": info["flops"] / case.batch / 1e9, "params M": info["params"] / 1e6})
    free_memory(device)
    return row


def matmul_ceiling(device: torch.device, n: int) -> float:
    """TFLOP/s of one n^3 bf16 matmul (the card's practical ceiling, measured in the same run)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sec = median(time_repeats(lambda: a @ b, device=device, warmup=3, repeats=10))
    return 2 * n**3 / sec / 1e12


def counted_flops_per_image(case: Case) -> tuple[float, float]:
    """(forward + backward FLOPs per image, parameters) of the plain model, counted on fake tensors:
    shapes only, no memory and no arithmetic, so it runs for any size on any machine in seconds."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    one = dataclasses.replace(case, batch=1)  # FLOPs are linear in the batch
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = plain_model(one)
        b = inputs(one, torch.device("cpu"))
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(b["x0"], timestep=torch.ones(1) * 500.0, encoder_hidden_states=b["emb"],
                        encoder_attention_mask=b["mask"], added_cond_kwargs=None, return_dict=False)[0]
            out.float().square().mean().backward()
        params = sum(p.numel() for p in model.parameters())
    return float(counter.get_total_flops()), float(params)


def flops_table(args, size: dict) -> int:
    """--flops-only: counted GFLOP per image and the img/s that given MFU levels mean on the card."""
    rows = []
    levels = args.mfu_levels
    for model in args.models or size["models"]:
        for text in args.texts or size["texts"]:
            flops, params = counted_flops_per_image(Case(model, text, size["latent"], 1))
            row = {"model": model, "text": f"{text} {TEXTS[text][0]}x{TEXTS[text][1]}", "params M": params / 1e6,
                   "GFLOP/img": flops / 1e9}
            for m in levels:
                row[f"img/s at {m:g}% MFU"] = m / 100 * args.peak_tflops * 1e12 / flops
            rows.append(row)
    columns = ["model", "text", "params M", "GFLOP/img", *[f"img/s at {m:g}% MFU" for m in levels]]
    notes = [f"Forward + backward of the plain diffusers model at batch 1, counted by torch.utils.flop_counter on "
             f"fake tensors (exact for any device); img/s = MFU x {args.peak_tflops:g} TFLOP/s / FLOPs per image."]
    report("train step FLOPs (counted)", rows, columns, args, torch.device("cpu"),
           digits={"GFLOP/img": 1, "params M": 1}, notes=notes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", choices=sorted(SIZES), default="paper",
                   help="paper (256 px DiTs) or tiny (CPU smoke test)")
    p.add_argument("--models", nargs="+", default=None, help="override the size set's models, e.g. DiT-XL/2")
    p.add_argument("--texts", nargs="+", default=None, choices=sorted(TEXTS), help="text feature shapes")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="rows: BASE[+LEVER...] (see above)")
    p.add_argument("--batch", type=int, default=None, help="batch for every model (default: per model, tiny 8)")
    p.add_argument("--caption-tokens", type=int, default=None,
                   help="real tokens per caption (3/4 to all of it, rest padding); default: no padding (all-ones "
                        "mask, as docs/references.md measured); recaptions average ~49 words (docs/references.md)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile for rows that ask for it: auto = on CUDA only (CPU compiles take minutes)")
    p.add_argument("--autocast", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for rows that use it: auto = on CUDA only "
                        "(CPUs without AMX emulate bf16, 10x slower)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the card's dense bf16 peak for MFU (default: H100 SXM, 989)")
    p.add_argument("--matmul", type=int, default=8192, help="also time an N^3 bf16 matmul on GPU (0 = skip)")
    p.add_argument("--keep-going", action="store_true", help="record a failing row and go on (OOM always does)")
    p.add_argument("--flops-only", action="store_true",
                   help="only count FLOPs per image (fake tensors, no compute) and the img/s that --mfu-levels mean")
    p.add_argument("--mfu-levels", type=float, nargs="+", default=[37.0, 45.0, 55.0],
                   help="MFU levels (%%) for --flops-only (default: the reference plain-levers 37%%, "
                        "the targets 45%% and 55%%)")
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's allow_tf32 default; fp32 rows use it
        torch.backends.cudnn.allow_tf32 = True
    size = SIZES[args.sizes]
    if args.flops_only:
        return flops_table(args, size)
    variants = [Variant.parse(v) for v in args.variants]
    rows = []
    for model in args.models or size["models"]:
        batch = args.batch or (8 if args.sizes == "tiny" else DEFAULT_BATCH.get(model, 64))
        for text in args.texts or size["texts"]:
            case = Case(model, text, size["latent"], batch, args.caption_tokens)
            base = None
            for variant in variants:
                row = run_row(case, variant, device, args)
                base = row if variant.base == "baseline" and not variant.levers and "img/s" in row else base
                if base is not None and "img/s" in row:
                    row["vs baseline"] = f"{row['img/s'] / base['img/s']:.2f}x"
                rows.append(row)
    notes = [f"MFU = counted FLOPs per step (torch.utils.flop_counter, forward + backward, eager, no recompute) / "
             f"step time / {args.peak_tflops:g} TFLOP/s; median of {args.steps} steps after {args.warmup} warm-up.",
             f"Latents {LATENT_CHANNELS}x{size['latent']}x{size['latent']} (256 px through an 8x VAE for 'paper'); "
             "random inputs, rectified-flow loss."]
    if device.type == "cuda" and args.matmul:
        tf = matmul_ceiling(device, args.matmul)
        notes.append(f"Same card, same run: a {args.matmul}^3 bf16 matmul ran at {tf:.0f} TFLOP/s "
                     f"({100 * tf / args.peak_tflops:.0f}% of {args.peak_tflops:g}).")
    columns = ["model", "text", "variant", "batch", "img/s", "step ms", "TFLOP/s", "MFU %", "peak GiB",
               "vs baseline", "GFLOP/img", "levers"]
    digits = {"GFLOP/img": 2, "peak GiB": 2, "TFLOP/s": 2 if device.type == "cpu" else 1}
    report("train step", rows, columns, args, device, digits=digits, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
