"""Captioning backends. The boundary is small on purpose: images + prompt texts in, `Generation`s out.

`TransformersBackend` runs any image-text-to-text model transformers loads (LLaVA-1.5/NeXT,
Idefics3/SmolVLM, Qwen2-VL, converted original-LLaVA checkpoints, ...) through its processor and
chat template. A vLLM or SGLang backend only has to implement `CaptionBackend` and be added to
`BACKENDS`; readers, prompts and the sidecar writer do not change.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal, Protocol

import torch
from PIL import Image

from t2i_recap.io import check_model_source
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)

# VQAScore (Lin et al. 2024) reads P("Yes") at the first answer token.
YES_VARIANTS = ("Yes", " Yes")


@dataclasses.dataclass
class Generation:
    text: str
    finish_reason: Literal["stop", "length"]  # "length": hit max_new_tokens before an end token
    num_tokens: int  # generated tokens, the end token not counted


class CaptionBackend(Protocol):
    """What the captioning loop needs from an engine."""

    def caption(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 128) -> list[Generation]: ...

    # Optional, for overlapping CPU preprocessing with generation: `prepare(images, prompts)` (thread-safe)
    # and `generate(prepared, max_new_tokens)`; the run loop uses them when both exist.

    def describe(self) -> dict: ...


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/"auto": bf16 on a GPU that supports it (the paper's setting), else fp32 (CPU bf16 is slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]


def default_device(local_rank: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank or 0)
    return torch.device("cpu")


def _load_model(model: str, dtype: torch.dtype, attn: str | None, trust_remote_code: bool):
    import transformers

    classes = [transformers.AutoModelForImageTextToText]
    # Older or remote-code checkpoints register under these instead.
    for name in ("AutoModelForVision2Seq", "AutoModelForCausalLM"):
        if hasattr(transformers, name):
            classes.append(getattr(transformers, name))
    errors = []
    for cls in classes:
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            try:
                return cls.from_pretrained(model, attn_implementation=attn, **kwargs)
            except (ValueError, ImportError) as exc:
                if attn is None or "attn" not in str(exc).lower() and "sdpa" not in str(exc).lower():
                    raise
                log.warning("%s: %s attention unavailable (%s); using the model's default", model, attn, exc)
                return cls.from_pretrained(model, **kwargs)
        except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{cls.__name__}: {exc}")
    raise ValueError(f"{model}: no transformers auto class loads this model as image-text-to-text:\n" + "\n".join(errors))


KVCache = Literal["dynamic", "static"]
KV_CACHES = ("dynamic", "static")
"""transformers' cache layouts: `dynamic` grows each layer's K/V by concatenation every decode step;
`static` (StaticCache) preallocates prompt + max_new_tokens positions once and writes in place."""


def _check_chat_template(processor, model_id: str) -> None:
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{model_id}: the processor has no chat template; add one (chat_template.jinja)")


class TransformersBackend:
    """Batched greedy captioning with a transformers vision-language model.

    Left padding (docs/references.md section 3: right padding silently degrades batched output), the
    processor's own chat template, bf16 + SDPA on GPU.
    """

    name = "transformers"

    def __init__(self, model: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 trust_remote_code: bool = False, attn_implementation: str | None = "sdpa",
                 kv_cache: KVCache = "dynamic") -> None:
        from transformers import AutoProcessor

        model_id = check_model_source(model, "captioner model")  # names a missing folder
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        _check_chat_template(processor, model_id)
        loaded = _load_model(model_id, dtype, attn_implementation, trust_remote_code)
        self._setup(loaded, processor, model_id, device, dtype, kv_cache)

    @classmethod
    def from_model(cls, model, processor, *, model_id: str | None = None, kv_cache: KVCache = "dynamic"
                   ) -> "TransformersBackend":
        """A backend around a model already in memory (built on the GPU, not saved and reloaded): its
        device and dtype are the model's. `model_id` names it in sidecar provenance."""
        _check_chat_template(processor, model_id or type(model).__name__)
        param = next(model.parameters())
        self = cls.__new__(cls)
        self._setup(model, processor, model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
                    param.device, param.dtype, kv_cache)
        return self

    def _setup(self, model, processor, model_id: str, device: torch.device, dtype: torch.dtype, kv_cache: str) -> None:
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {list(KV_CACHES)}, got {kv_cache!r}")
        self.model_id, self.device, self.dtype, self.kv_cache = model_id, device, dtype, kv_cache
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # LLaMA-3 ships without one; masked positions never matter
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval()
        self.stop_ids = self._stop_ids()
        # Decoding runs while the next batch is tokenised in another thread; a fast tokenizer must not
        # be used from two threads at once ("Already borrowed"), so decoding gets its own copy.
        self._decoder = copy.deepcopy(self.tokenizer)
        log.info("loaded %s (%s) on %s as %s", self.model_id, type(self.model).__name__, self.device, self.dtype)

    def _stop_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ValueError(f"{self.model_id}: neither the generation config nor the tokenizer names an end token")
        return set(ids)

    def describe(self) -> dict:
        cfg = self.model.config
        return {
            "backend": self.name,
            "model": self.model_id,
            "model_class": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "commit_hash": getattr(cfg, "_commit_hash", None),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "kv_cache": self.kv_cache,
        }

    def prepare(self, images: list[Image.Image], prompts: list[str]) -> dict:
        """CPU side of a batch (chat template, tokenising, image preprocessing); safe to run in a thread,
        so the next batch is prepared while the accelerator generates the current one."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
            for img, text in zip(images, prompts)
        ]
        return dict(self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            processor_kwargs={"padding": True, "padding_side": "left", "return_tensors": "pt"},
        ))

    def _to_device(self, inputs: dict) -> dict:
        return {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else v.dtype, non_blocking=True)
                for k, v in inputs.items()}

    def _inputs(self, images: list[Image.Image], prompts: list[str]) -> dict:
        return self._to_device(self.prepare(images, prompts))

    def caption(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 128,
                min_new_tokens: int = 0) -> list[Generation]:
        """Greedy decoding, at most `max_new_tokens` new tokens per image (the paper: 128).

        `min_new_tokens` forces longer outputs (benchmarks time a fixed number of tokens with it).
        """
        if not images:
            return []
        return self.generate(self.prepare(images, prompts), max_new_tokens, min_new_tokens)

    @torch.inference_mode()
    def generate(self, prepared: dict, max_new_tokens: int = 128, min_new_tokens: int = 0) -> list[Generation]:
        """Generate for a batch from `prepare`."""
        inputs = self._to_device(prepared)
        cache = {"cache_implementation": "static"} if self.kv_cache == "static" else {}
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None, do_sample=False, num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.stop_ids), **cache,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._generation(row, max_new_tokens) for row in new_tokens]

    def _generation(self, row: list[int], max_new_tokens: int) -> Generation:
        end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        tokens = row if end is None else row[:end]
        text = self._decoder.decode(tokens, skip_special_tokens=True).strip()
        reason = "stop" if end is not None or len(row) < max_new_tokens else "length"
        return Generation(text=text, finish_reason=reason, num_tokens=len(tokens))

    def yes_token_ids(self) -> list[int]:
        ids = []
        for word in YES_VARIANTS:
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if encoded and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids

    @torch.inference_mode()
    def yes_probability(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        """VQAScore: P("Yes") (any spelling in YES_VARIANTS) as the first answer token."""
        if not images:
            return []
        inputs = self._inputs(images, questions)
        logits = self.model(**inputs).logits[:, -1, :].float()  # left padding: the last position is real
        probs = torch.softmax(logits, dim=-1)[:, self.yes_token_ids()].sum(dim=-1)
        return probs.tolist()


BACKENDS = {"transformers": TransformersBackend}


def make_backend(name: str, model: str, **kwargs) -> CaptionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown captioning backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name](model, **kwargs)
