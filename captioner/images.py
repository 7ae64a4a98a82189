"""The captioner's image decode is the project's one decode: `t2i_recap.images` (re-exported here)."""

from t2i_recap.images import DEFAULT_MAX_PIXELS, BadImage, Decoded, decode_image, decode_pil, to_rgb

__all__ = ["DEFAULT_MAX_PIXELS", "BadImage", "Decoded", "decode_image", "decode_pil", "to_rgb"]
