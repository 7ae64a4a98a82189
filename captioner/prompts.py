"""Captioning prompts: the paper's prompt, an alt-text-conditioned variant, and custom templates.

The backend wraps the text returned here in the model's own chat template, next to the image.
"""

from __future__ import annotations

import string

# Li et al. 2024, section 3 ("What If We Recaption Billions of Web Images with LLaMA-3?"), verbatim.
RECAP_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."

# Recap-DataComp-1B v2 conditions the captioner on the original alt-text (the
# `re_caption_condition_diverse_topk` column). Its exact wording was not released; this one gives
# the alt-text as a hint the model may ignore, since web alt-texts are often wrong.
CONDITIONED_TEMPLATE = (
    RECAP_PROMPT
    + " The image's original web caption, which may be short, noisy or wrong, is: \"{org_caption}\"."
    + " Use it only as a hint."
)

PRESETS = ("recap", "conditioned", "custom")
# A hint longer than this is cut (with a note in the sidecar): a huge alt-text must not blow up
# the prompt past the model's context.
DEFAULT_MAX_HINT_CHARS = 1000


def template_fields(template: str) -> set[str]:
    """The `{field}` names used by a custom template."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"bad prompt template {template!r}: {exc}") from None


def check_template(template: str) -> str:
    fields = template_fields(template)
    if fields - {"org_caption"}:
        raise ValueError(
            f"prompt template {template!r} uses {sorted(fields - {'org_caption'})}; only {{org_caption}} is filled in"
        )
    return template


def build_prompt(
    preset: str,
    org_caption: str | None,
    template: str | None = None,
    max_hint_chars: int = DEFAULT_MAX_HINT_CHARS,
) -> str:
    """The user text for one image.

    `recap` ignores the caption. `conditioned` and `custom` (a template with an optional
    `{org_caption}` field) fall back to the paper's prompt when the caption is missing or blank,
    so a sample without alt-text is still captioned the standard way.
    """
    return build_prompt_with_notes(preset, org_caption, template, max_hint_chars)[0]


def build_prompt_with_notes(
    preset: str,
    org_caption: str | None,
    template: str | None = None,
    max_hint_chars: int = DEFAULT_MAX_HINT_CHARS,
) -> tuple[str, list[str]]:
    """`build_prompt` plus notes on what was changed (fallbacks, a cut hint) for the sidecar."""
    if preset == "recap":
        return RECAP_PROMPT, []
    if preset == "conditioned":
        template = CONDITIONED_TEMPLATE
    elif preset == "custom":
        if not template:
            raise ValueError("prompt preset 'custom' needs a template (--template)")
        check_template(template)
    else:
        raise ValueError(f"unknown prompt preset {preset!r}; choose one of {list(PRESETS)}")
    if "org_caption" not in template_fields(template):
        return template, []
    hint = " ".join((org_caption or "").split())  # newlines in alt-text would break the chat turn
    if not hint:
        return RECAP_PROMPT, ["no original caption: the recap prompt was used"]
    notes = []
    if len(hint) > max_hint_chars:
        notes.append(f"original caption cut from {len(hint)} to {max_hint_chars} characters in the prompt")
        hint = hint[:max_hint_chars]
    return template.format(org_caption=hint), notes
