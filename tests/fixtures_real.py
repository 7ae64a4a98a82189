"""Real-data fixtures, beside the shapes world: photographs that ship inside installed packages
(scikit-image's `skimage.data`, scikit-learn's sample images) and variants made from them (large,
grayscale, RGBA, 16-bit, CMYK, WebP, EXIF-rotated), written into webdataset shards by img2dataset
itself, downloading them from a local http.server as a user's url list would; and the real CLIP BPE
vocabulary of open_clip_torch as a `CLIPTokenizer` folder. Everything is built once per session."""

from __future__ import annotations

import functools
import gzip
import http.server
import importlib.util
import io
import json
import threading
from pathlib import Path

import pytest

# The Recap-DataComp-1B layout: img2dataset --caption_col re_caption --save_additional_columns
# '["org_caption"]', so `.txt` holds the recaption and `.json` the alt-text (org_caption).
ORG = "org caption of {}"
RECAP = "recaption of {}"
EXIF_ORIENTATION = 0x0112


def _photos() -> dict:
    """name -> RGB uint8 array, all shipped inside installed packages (no download)."""
    import numpy as np
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(),
            "coffee": skimage.data.coffee(), "camera": np.stack([skimage.data.camera()] * 3, -1),
            "china": china, "flower": flower}


def _encode(img, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(upright, orientation: int = 6) -> bytes:
    """`upright` stored as a camera does: pixels turned, EXIF Orientation saying how to turn them back."""
    from PIL import Image

    # Orientation 6 means "rotate 90 degrees clockwise to view": the stored pixels are turned counter-clockwise.
    stored = upright.transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
                                3: Image.Transpose.ROTATE_180}[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return _encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def real_variants() -> dict[str, dict[str, bytes]]:
    """Shard -> {file name: bytes}; each shard holds one encoding, as img2dataset's encode_format does."""
    import numpy as np
    from PIL import Image

    p = {k: Image.fromarray(v) for k, v in _photos().items()}
    flower_small = p["flower"].resize((160, 107), Image.Resampling.LANCZOS)
    gray16 = Image.fromarray((np.asarray(p["camera"].convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    rgba = p["astronaut"].resize((128, 128)).convert("RGBA")
    alpha = np.zeros((128, 128), dtype=np.uint8)
    alpha[16:112, 16:112] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "jpg": {"astronaut.jpg": _encode(p["astronaut"].resize((96, 96)), "JPEG", quality=92),
                "exif_rotated.jpg": exif_rotated_jpeg(flower_small),
                "cmyk.jpg": _encode(p["coffee"].resize((120, 80)).convert("CMYK"), "JPEG", quality=92),
                "gray.jpg": _encode(p["camera"].convert("L").resize((96, 96)), "JPEG", quality=92),
                "large.jpg": _encode(p["china"].resize((2560, 1707), Image.Resampling.BICUBIC), "JPEG", quality=85)},
        "png": {"rgba.png": _encode(rgba, "PNG"), "gray16.png": _encode(gray16.resize((96, 96)), "PNG"),
                "chelsea.png": _encode(p["chelsea"].resize((100, 75)), "PNG")},
        "webp": {"chelsea.webp": _encode(p["chelsea"].resize((100, 75)), "WEBP", quality=90),
                 "coffee.webp": _encode(p["coffee"].resize((90, 60)), "WEBP", quality=90)},
    }


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test log holds no request lines
        pass


def serve(folder: Path):
    """(server, base url) serving `folder` on 127.0.0.1 from a thread."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def img2dataset_shards(files: dict[str, bytes], out: Path, encode_format: str, work: Path) -> Path:
    """img2dataset.download over 127.0.0.1, original bytes kept (resize_mode='no', skip_reencode)."""
    import pandas as pd
    from img2dataset import download

    site = work / "site"
    site.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (site / name).write_bytes(data)
    server, base = serve(site)
    try:
        names = sorted(files)
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [f"{base}/{n}" for n in names], "re_caption": [RECAP.format(n) for n in names],
                      "org_caption": [ORG.format(n) for n in names], "name": names}).to_parquet(urls)
        download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="re_caption",
                 save_additional_columns=["org_caption", "name"], output_format="webdataset",
                 output_folder=str(out), processes_count=1, thread_count=2, resize_mode="no",
                 encode_format=encode_format, encode_quality={"png": 9}.get(encode_format, 95), skip_reencode=True, number_sample_per_shard=len(names),
                 timeout=10, retries=1, enable_wandb=False, compute_hash=None, distributor="multiprocessing")
    finally:
        server.shutdown()
    return out


def shard_by_name(folder: Path) -> dict:
    """name column -> (key, tar path) over the img2dataset shards in `folder`."""
    import pyarrow.parquet as pq

    out = {}
    for meta in sorted(folder.glob("*.parquet")):
        for row in pq.read_table(meta).to_pylist():
            if row["status"] == "success":
                out[row["name"]] = (row["key"], meta.with_suffix(".tar"))
    return out


@pytest.fixture(scope="session")
def real_photo_bytes():
    """{encoding: {file name: bytes}} of the real photographs and their variants."""
    return real_variants()


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory, real_photo_bytes):
    """{encoding: folder of img2dataset webdataset shards} (jpg, png, webp), made by img2dataset."""
    root = tmp_path_factory.mktemp("real_shards")
    return {fmt: img2dataset_shards(files, root / fmt, fmt, root / f"work_{fmt}")
            for fmt, files in real_photo_bytes.items()}


# ---------------------------------------------------------------- the real CLIP vocabulary


def open_clip_bpe_path() -> Path:
    """open_clip_torch's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in open_clip's order (open_clip/tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_from_bpe(bpe: Path) -> tuple[dict[str, int], list[str]]:
    """vocab + merges exactly as open_clip's SimpleTokenizer builds them (open_clip/tokenizer.py)."""
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(out: Path) -> Path:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_from_bpe(open_clip_bpe_path())
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")
    tok.model_max_length = 77
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def real_clip_tokenizer_dir(tmp_path_factory):
    """A CLIPTokenizer folder holding the real CLIP BPE vocabulary (49,408 tokens)."""
    return build_clip_tokenizer(tmp_path_factory.mktemp("real_clip_tokenizer"))


# ---------------------------------------------------------------- photographs of mixed aspect ratios

# (name, aspect w:h, stored with EXIF orientation 6): the upright photo of each is `aspect`.
BUCKET_ASPECTS = {"wide": (2, 1), "tall": (1, 2), "square": (1, 1), "four_three": (4, 3)}


def bucket_photos() -> dict[str, bytes]:
    """Real photographs cut to four aspect ratios (short side 48 px); three of the tall ones are stored
    turned, with EXIF orientation 6, as a phone writes a portrait photo."""
    from PIL import Image, ImageOps

    files = {}
    for i, (name, arr) in enumerate(sorted(_photos().items())):
        photo = Image.fromarray(arr).convert("RGB")
        for aspect, (w, h) in BUCKET_ASPECTS.items():
            if aspect == "four_three" and i == 5:
                continue  # 23 samples: the 4:3 bucket cannot fill its last micro-batch of 2
            scale = 48 / min(w, h)
            img = ImageOps.fit(photo, (round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
            data = exif_rotated_jpeg(img) if aspect == "tall" and i % 2 else _encode(img, "JPEG", quality=92)
            files[f"{name}_{aspect}.jpg"] = data
    return files


@pytest.fixture(scope="session")
def bucket_shards(tmp_path_factory):
    """One img2dataset webdataset shard (downloaded over 127.0.0.1) of 23 real photos: 6 wide (2:1),
    6 tall (1:2, three of them EXIF-rotated), 6 square, 5 at 4:3."""
    root = tmp_path_factory.mktemp("bucket_shards")
    return img2dataset_shards(bucket_photos(), root / "shards", "jpg", root / "work")
