"""VQA alignment: the probability that a vision-language model answers "Yes".

VQAScore (Lin et al. 2024) asks a VLM `Does this figure show "{prompt}"? Please answer yes or
no.` and reads P("Yes"). Prompts with constraints also get one derived question per constraint
("Are there exactly three red circles?"), averaged as DPG-Bench does with its question sets;
this partial credit localises a failure. The VLM is the captioner's backend
(`t2i_recap.captioner.backend.TransformersBackend.yes_probability`), loaded from a local folder.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from t2i_recap.shapes.captions import NUMBER_WORDS
from t2i_recap.shapes.world import COLS, ROWS

from .weights import require_model_dir

VQASCORE_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
_REL = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _noun(spec: dict, plural: bool = False) -> str:
    words = [w for w in (spec.get("size"), spec.get("color"), spec["shape"]) if w]
    return " ".join(words) + ("s" if plural else "")


def constraint_question(c: dict) -> str:
    """A yes/no question that is true exactly when the constraint holds."""
    kind = c["type"]
    if kind == "count":
        if c.get("exact"):
            return f"Are there exactly {NUMBER_WORDS.get(c['n'], c['n'])} {_noun(c, c['n'] > 1)}? Please answer yes or no."
        if c["n"] == 1:
            return f"Is there a {_noun(c)}? Please answer yes or no."
        return f"Are there at least {NUMBER_WORDS.get(c['n'], c['n'])} {_noun(c, True)}? Please answer yes or no."
    if kind == "relation":
        return f"Is the {_noun(c['a'])} {_REL[c['rel']]} the {_noun(c['b'])}? Please answer yes or no."
    if kind == "cell":
        where = "center" if (c["row"], c["col"]) == (1, 1) else f"{ROWS[c['row']]} {COLS[c['col']]}"
        return f"Is there a {_noun(c)} in the {where} of the image? Please answer yes or no."
    if kind == "total":
        return f"Are there exactly {NUMBER_WORDS.get(c['n'], c['n'])} shapes? Please answer yes or no."
    raise ValueError(f"no question for constraint type {kind!r}")


class VqaScorer:
    def __init__(self, path: str | Path, device: str | None = None):
        from t2i_recap.captioner.backend import TransformersBackend

        self.path = require_model_dir(path, "--vqa-model", "VQA score")
        self.backend = TransformersBackend(str(self.path), device=device)

    def _yes(self, images: list[Image.Image], questions: list[str], batch_size: int) -> list[float]:
        out: list[float] = []
        for start in range(0, len(images), batch_size):
            out.extend(self.backend.yes_probability(images[start:start + batch_size],
                                                    questions[start:start + batch_size]))
        return [float(p) for p in out]

    def score(self, images: list[Image.Image], prompts: list[str], constraints: list[list[dict]],
              batch_size: int = 16) -> list[dict]:
        """Per image: `vqa` (P(yes) for the whole prompt) and, with constraints, `vqa_derived`."""
        whole = self._yes(images, [VQASCORE_TEMPLATE.format(p) for p in prompts], batch_size)
        flat_imgs, flat_qs, owner = [], [], []
        for i, (img, cs) in enumerate(zip(images, constraints)):
            for c in cs:
                flat_imgs.append(img)
                flat_qs.append(constraint_question(c))
                owner.append(i)
        derived = self._yes(flat_imgs, flat_qs, batch_size) if flat_qs else []
        out = [{"vqa": p} for p in whole]
        per: dict[int, list[float]] = {}
        for i, p in zip(owner, derived):
            per.setdefault(i, []).append(p)
        for i, ps in per.items():
            out[i]["vqa_derived"] = sum(ps) / len(ps)
        return out
