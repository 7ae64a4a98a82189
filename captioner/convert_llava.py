"""`t2i-recap caption convert`: original LLaVA checkpoints -> transformers `LlavaForConditionalGeneration`.

The paper's captioner (LLaVA-1.5 with LLaMA-3-8B) was released in the original LLaVA repository's
layout (`LlavaLlamaForCausalLM`, model_type `llava_llama`), which transformers cannot load: the
official repository's most-asked issue. That layout is one state dict holding

* the LLaMA decoder: `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`;
* the projector: `model.mm_projector.{0,2}` (`mlp2x_gelu`: Linear, GELU, Linear);
* optionally the CLIP tower: `model.vision_tower.vision_tower.*` (else it is loaded from
  `mm_vision_tower`, a hub id or folder);

plus a LLaMA config extended with `mm_*` keys. The image goes in as a placeholder id (-200) with
no vocabulary entry, so conversion adds an `<image>` token. Every source tensor is mapped to
exactly one target tensor, and conversion fails if any is left over or missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import torch

from t2i_recap.cli_config import add_config_arguments, config_from_args
from t2i_recap.config import ConfigError
from t2i_recap.io import atomic_write_text
from t2i_recap.logging_utils import get_logger, setup_logging

from .chat_templates import LLAMA3_SYSTEM, TEMPLATES, VICUNA_SYSTEM

log = get_logger(__name__)

IMAGE_TOKEN = "<image>"
# Config keys of the LLaVA training code that are not LLaMA settings.
LLAVA_KEYS = {
    "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "use_mm_proj", "tokenizer_model_max_length", "tokenizer_padding_side", "unfreeze_mm_vision_tower",
    "_name_or_path", "architectures", "model_type", "transformers_version", "mm_vision_tower_lr",
}
PROJECTOR = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
             "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
TOWER_PREFIX = "model.vision_tower.vision_tower."


class ConversionError(ValueError):
    """The source is not an original-LLaVA checkpoint this converter can map exactly."""


# ---------------------------------------------------------------- reading the original layout


def read_original_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.exists():
        raise ConversionError(f"{src}: no config.json")
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    if "mm_vision_tower" not in cfg or not (cfg.get("model_type") == "llava_llama" or "LlavaLlamaForCausalLM" in archs):
        raise ConversionError(
            f"{src}: not an original-LLaVA checkpoint (need model_type 'llava_llama' or architecture "
            f"LlavaLlamaForCausalLM, and mm_vision_tower); found model_type={cfg.get('model_type')!r}, architectures={archs}"
        )
    return cfg


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: safetensors (single or sharded) or, as the original releases, .bin."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        return state
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for f in bins:  # weights_only: a tensor-only unpickler, no arbitrary code from the file
        state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return state


# ---------------------------------------------------------------- config


def _check_supported(cfg: dict) -> None:
    projector = cfg.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type {projector!r}: transformers' LLaVA projector is Linear-GELU-Linear (mlp2x_gelu) only"
        )
    if cfg.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end: image start/end tokens are not supported by LlavaForConditionalGeneration")
    if str(cfg.get("mm_patch_merge_type", "flat")) != "flat" or cfg.get("image_aspect_ratio") == "anyres":
        raise ConversionError("anyres / spatial patch merging is LLaVA-NeXT; convert to LlavaNextForConditionalGeneration instead")
    if cfg.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {cfg['mm_vision_select_feature']!r} is not patch or cls_patch")


def build_config(cfg: dict, vision_config, vocab_size: int, image_token_id: int):
    from transformers import LlamaConfig, LlavaConfig

    _check_supported(cfg)
    text = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in LLAVA_KEYS}
    text["vocab_size"] = vocab_size
    if vision_config.hidden_size != cfg.get("mm_hidden_size", vision_config.hidden_size):
        raise ConversionError(
            f"mm_hidden_size {cfg['mm_hidden_size']} differs from the vision tower's hidden size {vision_config.hidden_size}"
        )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**text),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------- weights


def map_key(key: str, targets: set[str]) -> str | None:
    """Target name of one source tensor; None for tensors recomputed at load time (rotary inv_freq)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for src, dst in PROJECTOR.items():
        if key.startswith(src):
            return dst + key[len(src):]
    if key.startswith(TOWER_PREFIX):
        rest = key[len(TOWER_PREFIX):]
        candidates = ["model.vision_tower." + rest, "model.vision_tower." + rest.removeprefix("vision_model.")]
    elif key.startswith("model."):
        candidates = ["model.language_model." + key[len("model."):]]
    else:
        candidates = [key]  # lm_head.weight
    for name in candidates:
        if name in targets:
            return name
    raise ConversionError(f"source tensor {key!r} has no place in LlavaForConditionalGeneration (tried {candidates})")


def tower_state(vision_tower: str) -> dict[str, torch.Tensor]:
    """CLIP vision weights from a folder or hub id, named as in the original layout."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(vision_tower)
    return {TOWER_PREFIX + k: v for k, v in tower.state_dict().items()}


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows for added tokens, set to the mean row (as transformers' own LLaVA conversion does)."""
    if rows <= weight.shape[0]:
        return weight
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def map_state_dict(state: dict[str, torch.Tensor], target_shapes: dict[str, torch.Size],
                   tied: bool = False) -> tuple[dict, dict]:
    """Rename every source tensor; returns (target state dict, report). Fails on leftovers or gaps."""
    targets = set(target_shapes)
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, tensor in state.items():
        name = map_key(key, targets)
        if name is None:
            dropped.append(key)
            continue
        if name in out:
            raise ConversionError(f"two source tensors map to {name!r}")
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = _grow_rows(tensor, target_shapes[name][0])
        if tensor.shape != target_shapes[name]:
            raise ConversionError(f"{key}: shape {tuple(tensor.shape)} but {name} needs {tuple(target_shapes[name])}")
        out[name] = tensor
    missing = sorted(targets - set(out) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ConversionError(f"no source tensor for {len(missing)} target tensors, e.g. {missing[:5]}")
    return out, {"source_tensors": len(state), "mapped": len(out), "dropped": dropped}


# ---------------------------------------------------------------- tokenizer and processor


def choose_template(tokenizer, name: str) -> str:
    if name == "auto":
        name = "llama_3" if "<|start_header_id|>" in tokenizer.get_vocab() else "vicuna_v1"
    if name not in TEMPLATES:
        raise ConversionError(f"unknown chat template {name!r}; choose auto or one of {sorted(TEMPLATES)}")
    return name


def build_processor(tokenizer, vision_tower: str, vision_config, cfg: dict, template: str, system: str | None):
    import transformers
    from transformers import LlavaProcessor

    image_cls = getattr(transformers, "LlavaImageProcessorPil", None) or transformers.LlavaImageProcessor
    try:  # the tower's own preprocessing (resize, crop, mean/std), if it ships one
        clip = transformers.CLIPImageProcessor.from_pretrained(vision_tower)
        kwargs = {k: getattr(clip, k) for k in ("size", "crop_size", "image_mean", "image_std", "resample")}
    except (OSError, ValueError):
        side = vision_config.image_size
        kwargs = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    # image_aspect_ratio "pad": LLaVA-1.5 pads to a square filled with the mean colour before resizing.
    image_processor = image_cls(do_pad=cfg.get("image_aspect_ratio") == "pad", **kwargs)
    default_system = LLAMA3_SYSTEM if template == "llama_3" else VICUNA_SYSTEM
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=TEMPLATES[template](system if system is not None else default_system),
        image_token=IMAGE_TOKEN,
    )


def _stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    for tok in ("<|eot_id|>", "<|end_of_text|>"):  # LLaMA-3 ends a turn with <|eot_id|>
        tid = tokenizer.get_vocab().get(tok)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return [i for i in ids if i is not None]


# ---------------------------------------------------------------- the conversion


def convert(src: str | Path, out: str | Path, *, vision_tower: str | None = None, tokenizer: str | None = None,
            chat_template: str = "auto", system_prompt: str | None = None) -> dict:
    """Convert `src` (original LLaVA layout) into a transformers folder `out`; returns the report."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, CLIPVisionConfig, GenerationConfig, LlavaForConditionalGeneration

    src, out = Path(src), Path(out)
    cfg = read_original_config(src)
    state = read_state_dict(src)
    tower = vision_tower or cfg["mm_vision_tower"]
    has_tower = any(k.startswith(TOWER_PREFIX) for k in state)
    if not has_tower:
        log.info("%s holds no vision tower weights; loading them from %s", src, tower)
        state.update(tower_state(tower))
    vision_config = CLIPVisionConfig.from_pretrained(tower)

    tok = AutoTokenizer.from_pretrained(str(tokenizer or src))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:  # LLaVA trained with pad = unk (LLaMA-2) ; LLaMA-3 has neither
        tok.pad_token = tok.unk_token or tok.eos_token
    template = choose_template(tok, chat_template)
    vocab = max(cfg["vocab_size"], len(tok))
    config = build_config(cfg, vision_config, vocab, tok.convert_tokens_to_ids(IMAGE_TOKEN))

    with init_empty_weights():
        model = LlavaForConditionalGeneration(config)
    target_shapes = {k: v.shape for k, v in model.state_dict().items()}
    tied = bool(config.tie_word_embeddings)
    mapped, report = map_state_dict(state, target_shapes, tied)
    model.load_state_dict(mapped, strict=not tied, assign=True)
    model.tie_weights()
    dtype = next(iter(mapped.values())).dtype
    model.config.dtype = dtype
    stop = _stop_ids(tok)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop if len(stop) > 1 else stop[0], pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=128,
        suppress_tokens=[config.image_token_index],  # the added placeholder must never be generated
    )
    processor = build_processor(tok, tower, vision_config, cfg, template, system_prompt)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report.update({
        "source": str(src), "vision_tower": tower, "vision_tower_from_checkpoint": has_tower,
        "chat_template": template, "image_token_id": config.image_token_index,
        "vocab_size": {"original": cfg["vocab_size"], "converted": vocab},
        "dtype": str(dtype).removeprefix("torch."),
        "image_aspect_ratio": cfg.get("image_aspect_ratio"),
    })
    atomic_write_text(out / "conversion.json", json.dumps(report, indent=2))
    return report


@dataclasses.dataclass
class ConvertConfig:
    """What `t2i-recap caption convert` converts (its flags, or --config / --set)."""

    src: str = ""
    """Original checkpoint folder (config.json with mm_* keys + weights)."""
    out: str = ""
    """Output folder (LlavaForConditionalGeneration + LlavaProcessor)."""
    vision_tower: str | None = None
    """CLIP folder or hub id; default: the config's mm_vision_tower."""
    tokenizer: str | None = None
    """Tokenizer folder or id; default: the source folder."""
    chat_template: typing.Literal["auto", "llama_3", "vicuna_v1"] = "auto"  # "auto" + chat_templates.TEMPLATES
    """Conversation format; auto picks llama_3 for LLaMA-3 tokenizers, else vicuna_v1."""
    system_prompt: str | None = None
    """System prompt of the chat template (default: the format's own)."""


FLAGS = {"--src": "src", "--out": "out", "--vision-tower": "vision_tower", "--tokenizer": "tokenizer",
         "--chat-template": "chat_template", "--system-prompt": "system_prompt"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i-recap caption convert",
                                description="convert an original-LLaVA (llava_llama) checkpoint to transformers")
    add_config_arguments(p, ConvertConfig, FLAGS, required=("--src", "--out"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = config_from_args(ConvertConfig, parser.parse_args(argv))
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging()
    try:
        report = convert(args.src, args.out, vision_tower=args.vision_tower, tokenizer=args.tokenizer,
                         chat_template=args.chat_template, system_prompt=args.system_prompt)
    except (ConversionError, OSError) as exc:
        print(f"t2i-recap caption convert: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
