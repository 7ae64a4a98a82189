"""CLIP score (torchmetrics' `CLIPScore` over a local CLIP). The scorer lives in the core
(t2i_recap.clip_score) because `caption stats` scores captions with it too."""

from t2i_recap.clip_score import CLIP_EXTRA_FILES, ClipScorer, load_clip, to_uint8_tensor  # noqa: F401
