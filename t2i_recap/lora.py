"""LoRA on an exported pipeline's DiT (peft): train only low-rank adapters on the attention
projections, save them as a peft adapter folder.

PixArtTransformer2DModel has no diffusers LoRA loader (no PeftAdapterMixin in diffusers 0.42), so
the adapter is saved with peft's own `save_pretrained` (adapter_config.json + adapter_model.safetensors)
and loads onto the exported transformer with `peft.PeftModel.from_pretrained(pipe.transformer, DIR)`
or `t2i_recap.lora.load_lora(pipe, DIR)`, which injects it in place so the pipeline is unchanged.

Captions, latents and the objective are those of the export: the pipeline's own text encoder and VAE
encode each batch as the trainer's on-the-fly path does; the objective is the one the export names,
with the timestep shift its scheduler carries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from t2i_recap.cache import FeatureEncoder, FeaturesConfig, latents_from, model_identity
from t2i_recap.cli_config import add_config_arguments, add_options, config_from_args, options_from_args
from t2i_recap.config import ConfigError, save_config
from t2i_recap.data import DataConfig, build_source, make_loader
from t2i_recap.io import output_dir
from t2i_recap.logging_utils import get_logger, setup_logging
from t2i_recap.mixing import MixingConfig, choose, select, trim_padding
from t2i_recap.objectives import ObjectiveConfig, build_objective
from t2i_recap.text_encoders import TextEncoderConfig
from t2i_recap.trainer import step_generator

log = get_logger(__name__)
KIND = "t2i-recap lora"
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclasses.dataclass
class LoraConfig:
    rank: int = 16
    """LoRA rank r of each adapter."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module names to adapt (PixArt attention: to_q, to_k, to_v, to_out.0 in self- and cross-attention)."""
    init_seed: int = 0
    """Seed of the adapters' random A matrices (B starts at zero, so an untrained adapter changes nothing)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")

    def peft(self):
        import peft

        return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.target_modules), init_lora_weights=True)


@dataclasses.dataclass
class LoraRunConfig:
    """Settings of `t2i-recap lora train` (--pipeline and --out come from the command line)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Training shards and caption fields (data.resolution should match the export's)."""
    mixing: MixingConfig = dataclasses.field(default_factory=MixingConfig)
    """Caption mix and CFG dropout, as in training."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """Adapter rank, alpha and target modules."""
    lr: float = 1e-4
    """AdamW learning rate of the adapters."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 4
    """Samples per step."""
    seed: int = 0
    """Seed of the data order and of every step's random draws."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be >= 1")


def export_objective(pipeline: Path, pipe) -> ObjectiveConfig:
    """The export's objective (t2i_recap.json) with its scheduler's timestep shift."""
    settings = json.loads((pipeline / "t2i_recap.json").read_text())
    name = settings["objective"]
    shift = float(pipe.scheduler.config.get("flow_shift", 1.0) or 1.0) if name == "rectified_flow" else 1.0
    return ObjectiveConfig(name=name, shift=shift)


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap `transformer` in a peft model with fresh adapters; only adapter parameters train."""
    import peft

    torch.manual_seed(cfg.init_seed)
    model = peft.get_peft_model(transformer, cfg.peft())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any("lora_" not in n for n in trainable):
        raise RuntimeError(f"LoRA wrapping left non-adapter parameters trainable: {trainable[:3]}")
    return model


def load_lora(pipe, lora_dir: str | Path) -> None:
    """Inject a saved adapter into `pipe.transformer` in place (the pipeline object stays as it was)."""
    import peft
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    cfg = peft.LoraConfig.from_pretrained(str(lora_dir))
    peft.inject_adapter_in_model(cfg, pipe.transformer)
    result = peft.set_peft_model_state_dict(pipe.transformer, load_file(str(lora_dir / "adapter_model.safetensors")))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{lora_dir}: adapter weights that match no module of the transformer: {missing[:3]}")


def _features(encoder: FeatureEncoder, empty: dict, batch: dict, mixing: MixingConfig, gen: torch.Generator):
    f = encoder.encode_batch(batch)
    x0 = latents_from(f, gen, encoder.scaling_factor, encoder.shift_factor)
    choice, _ = choose(f["has_original"], f["has_recaption"], mixing, gen)
    emb, mask = select(choice, (f["original_emb"], f["original_mask"]), (f["recaption_emb"], f["recaption_mask"]),
                       (empty["emb"], empty["mask"]))
    emb, mask = trim_padding(emb, mask)
    return x0, emb.float(), None if mask is None else mask.float()


def train_lora(pipeline: str | Path, cfg: LoraRunConfig, out: str | Path, *, overwrite: bool = False) -> dict:
    """Train adapters on the export's transformer and write them to `out`; returns a summary."""
    from diffusers import PixArtAlphaPipeline

    pipeline = Path(pipeline)
    pipe = PixArtAlphaPipeline.from_pretrained(str(pipeline))
    settings = json.loads((pipeline / "t2i_recap.json").read_text())
    objective = build_objective(export_objective(pipeline, pipe))
    encoder = FeatureEncoder(FeaturesConfig(vae=str(pipeline), vae_subfolder="vae", dtype="float32"),
                             TextEncoderConfig(name_or_path=str(pipeline), subfolder="text_encoder",
                                               tokenizer_subfolder="tokenizer", max_length=settings["max_sequence_length"]),
                             "cpu")
    empty = encoder.empty()
    model = add_lora(pipe.transformer.float().train(), cfg.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loader = make_loader(build_source(cfg.data), batch_size=cfg.batch_size, seed=cfg.seed, rank=0, world=1,
                         buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers)
    batches, losses = iter(loader), []

    def model_fn(x, t, **cond):
        return model(x, timestep=t, added_cond_kwargs=None, return_dict=False, **cond)[0]

    for step in range(cfg.max_steps):
        gen = step_generator(cfg.seed, 0, step, 0)
        x0, emb, mask = _features(encoder, empty, next(batches), cfg.mixing, gen)
        loss = objective.loss(model_fn, x0, gen, encoder_hidden_states=emb, encoder_attention_mask=mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: LoRA loss is not finite ({float(loss)}); nothing written")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    summary = {"steps": cfg.max_steps, "last_loss": losses[-1], "first_loss": losses[0],
               "base_transformer": model_identity(str(pipeline), "transformer"),
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    with output_dir(out, kind=KIND, overwrite=overwrite, protect=(pipeline,)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_config(cfg, tmp / "lora_config.yaml")
        (tmp / "t2i_recap.json").write_text(json.dumps(summary, indent=2))
    log.info("LoRA: %d steps, loss %.4f -> %.4f, written to %s", cfg.max_steps, losses[0], losses[-1], out)
    return summary


@dataclasses.dataclass
class LoraOptions:
    """Where one `t2i-recap lora train` call reads and writes (not part of the saved lora_config.yaml)."""

    pipeline: str = ""
    """An exported pipeline folder (t2i-recap export --out)."""
    out: str = ""
    """Adapter output folder."""
    overwrite: bool = False
    """Replace an earlier adapter folder at --out."""


FLAGS: dict[str, str] = {}  # every LoraRunConfig field through --config / --set
OPTIONS = {"--pipeline": "pipeline", "--out": "out", "--overwrite": "overwrite"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap lora train",
                                description="Train LoRA adapters on an exported pipeline's DiT (peft).")
    add_config_arguments(p, LoraRunConfig, FLAGS,
                         config_help="YAML with data, mixing, lora, lr, max_steps, batch_size, seed")
    add_options(p, LoraOptions, OPTIONS, required=("--pipeline", "--out"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    args = options_from_args(LoraOptions, ns)
    setup_logging()
    try:
        cfg = config_from_args(LoraRunConfig, ns)
    except (ConfigError, ValueError) as exc:
        print(f"t2i-recap lora train: {exc}", file=sys.stderr)
        return 2
    if not (Path(args.pipeline) / "t2i_recap.json").is_file():
        print(f"t2i-recap lora train: {args.pipeline} is not a t2i-recap export (no t2i_recap.json)", file=sys.stderr)
        return 2
    train_lora(args.pipeline, cfg, args.out, overwrite=args.overwrite)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
