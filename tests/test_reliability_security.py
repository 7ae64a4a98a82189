"""Security, checked on one tiny caption -> train -> export -> stats -> eval run whose
inputs are hostile: captions and prompts with <script>, HTML, markdown fences and control
characters, a custom captioning prompt carrying HTML into the sidecar provenance.

* only safetensors and JSON hold models and state: every file the run writes is scanned, and the
  run loads nothing through pickle (torch.load / pickle.load are booby-trapped throughout);
* trust_remote_code is off unless asked: a model folder whose config needs remote code is refused,
  and its code never runs;
* hostile text comes out escaped in every report: eval report.html / report.md, the caption stats
  markdown and the exported model card (rendered as a hub would render it);
* no key or caption chooses a path outside the output folder.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from fixtures_train import train_config_dict, write_shards

HOSTILE = [
    '<script>alert("caption")</script> a red circle',
    "<img src=x onerror=alert(1)> two blue squares",
    'a "quoted" & <b>bold</b> | pipe | caption',
    "ctrl \x1b[31mred\x1b[0m nul\x00 bell\x07 rtl\u202e caption",
    "```\n</code></pre><script>alert(2)</script>\n```",
    "../../../escape-by-caption",
]
TEMPLATE = "<script>alert('prompt')</script> Describe the image. Alt text: {org_caption}"
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

ALLOWED_SUFFIXES = {".safetensors", ".json", ".jsonl", ".yaml", ".md", ".txt", ".png", ".parquet", ".html",
                    ".jinja"}
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: steadier on one thread


def _rewrite_captions(tar_path: Path, captions: list[str]) -> None:
    """Replace the .txt caption of the shard's first len(captions) samples."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    hostile = dict(zip(keys, captions))
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            if ext == "txt" and key in hostile:
                data = hostile[key].encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _no_pickle(*_a, **_k):
    raise AssertionError("a model or state file was read through pickle")


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir, train_assets):
    """Run the whole hostile pipeline once; returns its folders and results."""
    from t2i_recap.captioner import stats as caption_stats
    from t2i_recap.captioner.backend import TransformersBackend
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.config import from_dict
    from t2i_recap.evaluate.compare import main as compare_main
    from t2i_recap.evaluate.run import EvalConfig, run_eval
    from t2i_recap.export import export
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    root = tmp_path_factory.mktemp("hostile_world")
    inputs, outs = root / "in", root / "out"
    shards = write_shards(inputs / "shards", num=12, shard_size=6)
    _rewrite_captions(shards / "00000.tar", HOSTILE)
    prompts = inputs / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"../../p{i}", "prompt": p}) + "\n" for i, p in enumerate(HOSTILE)))
    base = root.parent
    before = {p for p in _files(base) if root not in p.parents}
    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", _no_pickle)
        mp.setattr(pickle, "load", _no_pickle)
        mp.setattr(pickle, "loads", _no_pickle)
        backend = TransformersBackend(str(tiny_llava_dir), device="cpu", dtype="float32")
        cap = caption_run(CaptionRunConfig(input=str(inputs / "shards"), out=str(outs / "sidecars"),
                                           model=str(tiny_llava_dir), prompt="custom", template=TEMPLATE,
                                           batch_size=4, max_new_tokens=8), Dist(), backend)
        cfg = train_config_dict(train_assets, inputs / "shards", outs / "run", outs / "sidecars",
                                mixing={"p": 0.0, "cfg_dropout": 0.0}, trainer={"max_steps": 2},
                                checkpoint={"every_steps": 1, "keep": 3},
                                validation={"every_steps": 0, "prompts": HOSTILE[:2], "seeds": [0]})
        summary = train(from_dict(TrainConfig, cfg))
        cfg["trainer"]["max_steps"] = 3
        resumed = train(from_dict(TrainConfig, cfg), resume="latest")  # reads a checkpoint back
        export(outs / "run", outs / "export")
        assert caption_stats.main(["--sidecars", str(outs / "sidecars"), "--out", str(outs / "stats")]) == 0
        run_eval(EvalConfig(model=str(outs / "export"), suite=str(prompts), out=str(outs / "eval"),
                            images_per_prompt=1, steps=2, recaption="none", reference="none", batch_size=8))
        assert compare_main([str(outs / "eval"), str(outs / "eval"), "--out", str(outs / "compare"),
                             "--labels", f"{HOSTILE[0]},{HOSTILE[1]}"]) == 0  # hostile row names
    torch.set_num_threads(threads)
    after = {p for p in _files(base) if root not in p.parents and p.stat().st_mtime >= started}
    return {"root": root, "inputs": inputs, "outs": outs, "caption": cap, "train": summary, "resumed": resumed,
            "outside": sorted(after - before)}


def test_recaptions_reach_training(world):
    """The sidecars the captioner writes are the ones training reads (status "ok" rows)."""
    assert world["caption"]["counts"]["ok"] == 12 and not world["caption"]["shards_failed"]
    counts = world["train"]["mix_counts"]
    assert counts["recaption"] == 8 and counts["original"] == 0, counts  # p=0: every sample its recaption
    assert world["resumed"]["step"] == 3


def test_only_safetensors_and_json_hold_models_and_state(world):
    from safetensors import safe_open

    written = sorted(_files(world["outs"]))
    assert any(p.suffix == ".safetensors" for p in written)
    bad = []
    for path in written:
        if path.name.startswith("events.out.tfevents."):  # TensorBoard scalars (protobuf records)
            continue
        if path.suffix not in ALLOWED_SUFFIXES:
            bad.append(f"{path.relative_to(world['outs'])}: {path.suffix or 'no suffix'} is not an allowed format")
            continue
        head = path.read_bytes()[:4]
        if head[:1] == b"\x80" or head == b"PK\x03\x04":  # a pickle stream or torch.save's zip archive
            bad.append(f"{path.relative_to(world['outs'])}: pickle/zip content")
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:  # parses the header: a real safetensors file
                assert list(f.keys()), path
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    assert not bad, "\n".join(bad)
    checkpoint = world["outs"] / "run/checkpoints/step-00000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                          "optimizer.safetensors", "state.json"]


def _rendered_markdown(text: str) -> str:
    """HTML as a hub renders a model card / GitHub a README (raw HTML passes through)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(text)


class _Markup(HTMLParser):
    """Collects what a browser would build: elements, attributes, and the text shown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v or "") for k, v in attrs)

    def handle_data(self, data):
        self.text.append(data)


def _assert_escaped(name: str, html_text: str, shown: bool = True) -> None:
    """No hostile element or handler became markup, no raw control character; the text is still shown."""
    parsed = _Markup()
    parsed.feed(html_text)
    assert not {"script", "iframe", "object", "embed", "b"} & set(parsed.tags), (name, sorted(set(parsed.tags)))
    handlers = [a for a in parsed.attrs if a[1].lower().startswith("on")]
    assert not handlers, (name, handlers)
    images = [v for tag, k, v in parsed.attrs if tag == "img" and k == "src"]
    ours = [v for v in images if v.startswith("data:image/png;base64,") or re.fullmatch(r"[\w.\-]+\.png", v)]
    assert ours == images, (name, [v[:40] for v in images])  # embedded or local plots only
    assert not CONTROL.search(html_text), (name, CONTROL.search(html_text))
    if shown:
        assert '<script>alert("caption")</script>' in "".join(parsed.text), f"{name}: the hostile prompt was dropped"


def test_hostile_text_is_escaped_in_every_report(world):
    outs = world["outs"]
    for page in ("eval/report.html", "compare/compare.html"):
        _assert_escaped(page, (outs / page).read_text(encoding="utf-8"))
    # stats.md shows numbers, not captions (the hostile ones sit in the sidecars it reads)
    for name, path, shown in [("report.md", outs / "eval/report.md", False), ("stats.md", outs / "stats/stats.md", False),
                              ("compare.md", outs / "compare/compare.md", True),
                              ("model card", outs / "export/README.md", True)]:
        text = path.read_text(encoding="utf-8")
        _assert_escaped(f"{name} (rendered)", _rendered_markdown(text), shown)
    card = (outs / "export/README.md").read_text(encoding="utf-8")
    assert "alert" in card  # the hostile validation prompts and template are in the card, as code


def test_no_key_or_caption_writes_outside_the_output_folder(world):
    assert world["outside"] == [], f"files written outside the run's folders: {world['outside']}"
    assert sorted(p.name for p in world["root"].iterdir()) == ["in", "out"]
    images = sorted(p.name for p in (world["outs"] / "eval").rglob("*.png"))
    assert images and all(re.fullmatch(r"\d{5}_\d{2}\.png", n) for n in images)  # names never from prompt ids


def test_unsafe_keys_and_member_names_are_skipped_not_written(tmp_path, hostile_shard):
    """`../escape.png`, `sub/dir.png`, `bad key.png`: recorded as skipped; nothing lands beside the sidecar."""
    import pyarrow.parquet as pq

    from t2i_recap.captioner.backend import Generation
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run

    class EchoBackend:
        def caption(self, images, prompts, max_new_tokens=128, **_):
            return [Generation("../../../x <script>", "stop", 3) for _ in images]

        def describe(self):
            return {"backend": "echo"}

    out = tmp_path / "out"
    caption_run(CaptionRunConfig(input=str(hostile_shard), out=str(out), model="echo"), Dist(), EchoBackend())
    rows = {r["key"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    for key in ("../escape", "sub/dir", "bad key"):
        assert rows[key]["status"] == "skipped" and "unsafe sample key" in rows[key]["error"], rows[key]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["00000.parquet", "caption_config.yaml", "out"]


REMOTE_CODE = '''
import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("pwned")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil_vlm"
'''


def test_remote_code_is_refused_unless_asked(tmp_path, capsys):
    from t2i_recap.captioner.backend import TransformersBackend
    from t2i_recap.captioner.run import main

    model = tmp_path / "evil"
    model.mkdir()
    auto = {"AutoConfig": "configuration_evil.EvilConfig", "AutoProcessor": "configuration_evil.EvilConfig",
            "AutoModelForImageTextToText": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps({"model_type": "evil_vlm", "auto_map": auto}))
    (model / "preprocessor_config.json").write_text(json.dumps({"auto_map": auto, "processor_class": "EvilConfig"}))
    (model / "configuration_evil.py").write_text(REMOTE_CODE)
    with pytest.raises(Exception, match="trust_remote_code"):
        TransformersBackend(str(model), device="cpu")
    shards = tmp_path / "shards"
    write_shards(shards, num=2, shard_size=2)
    code = main(["--input", str(shards), "--out", str(tmp_path / "caps"), "--model", str(model)])
    assert code != 0
    assert not (model / "REMOTE_CODE_RAN").exists(), "the checkpoint's code ran without trust_remote_code"
    assert not list((tmp_path / "caps").glob("*.parquet"))


def test_no_code_path_turns_remote_code_on_by_default():
    """Every trust_remote_code in the library defaults to False and is never hard-wired to True."""
    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*repo.glob("t2i_recap/**/*.py"), *repo.glob("captioner/*.py"), *repo.glob("evaluate/*.py")]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"trust_remote_code\s*(:\s*bool\s*)?=\s*True", line):
                offenders.append(f"{path.relative_to(repo)}:{n}: {line.strip()}")
    assert not offenders, offenders
    from t2i_recap.captioner.run import CaptionRunConfig

    assert CaptionRunConfig().trust_remote_code is False
