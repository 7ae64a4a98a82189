"""The pipeline on real photographs: caption img2dataset shards with the tiny captioner, train a
tiny DiT whose text encoder uses the real CLIP vocabulary, export it, evaluate it."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from fixtures_eval import build_tiny_clip
from fixtures_train import build_tiny_encoders, train_config_dict, write_config

from t2i_recap.config import from_dict
from t2i_recap.train_config import TrainConfig


@pytest.mark.slow
def test_caption_train_export_eval_on_real_photos(tmp_path, real_shards, tiny_llava_dir, real_clip_tokenizer_dir,
                                                  one_thread):
    from t2i_recap.captioner.run import main as caption_main
    from t2i_recap.cli import main as cli_main
    from t2i_recap.export import main as export_main
    from t2i_recap.trainer import train

    shards = tmp_path / "shards"  # every encoding in one folder of img2dataset shards
    for i, fmt in enumerate(("jpg", "png", "webp")):
        shutil.copy(real_shards[fmt] / "00000.tar", shards.mkdir(exist_ok=True) or shards / f"{i:05d}.tar")
    recaps = tmp_path / "recaps"
    assert caption_main(["--input", str(shards), "--out", str(recaps), "--model", str(tiny_llava_dir),
                         "--set", "max_new_tokens=6"]) == 0
    rows = [r for p in sorted(recaps.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 10 and all(r["status"] == "ok" and r["org_caption"].startswith("org caption of") for r in rows)
    assert sum("EXIF orientation" in (r["notes"] or "") for r in rows) == 1

    assets = build_tiny_encoders(tmp_path / "assets", real_clip_tokenizer_dir)
    run = tmp_path / "run"
    cfg = train_config_dict(assets, shards, run, recaps)
    cfg["data"].update(original_caption="json:org_caption", recaption="sidecar:re_caption",
                       image_extensions=["jpg", "png", "webp"])
    cfg["mixing"]["p"] = 0.5
    train(from_dict(TrainConfig, cfg, source=str(write_config(tmp_path / "train.yaml", cfg))))
    assert (run / "checkpoints" / "step-00000004" / "state.json").is_file()

    export = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(export)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na cup of coffee on a table\n")
    report_dir = tmp_path / "eval"
    scorer = build_tiny_clip(tmp_path / "scorer", real_clip_tokenizer_dir)  # a CLIPModel over the real vocabulary
    assert cli_main(["eval", "run", "--model", str(export), "--suite", str(prompts), "--out", str(report_dir),
                     "--images-per-prompt", "1", "--batch-size", "2", "--clip", str(scorer),
                     "--recaption", "none", "--steps", "2", "--seed", "0"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["timing"]["images_generated"]["raw"] == 2
    assert report["provenance"]["model"]["sidecar"]["caption_p"] == 0.5
    assert any("clip" in name for name in report["variants"]["raw"]["metrics"]), report["variants"]["raw"]["metrics"]
