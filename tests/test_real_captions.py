"""Caption specs mean the same on every route: img2dataset tars read directly, the same tars read
through datasets.load_dataset("webdataset", ...), for the captioner and for the trainer. The shards
are in the Recap-DataComp-1B layout: `.txt` = the recaption, `.json` org_caption = the alt-text."""

from __future__ import annotations

import pytest
from fixtures_real import ORG, RECAP, shard_by_name

from t2i_recap.caption_specs import CaptionSpecError


def _reader_captions(source: str, **cfg) -> dict:
    from t2i_recap.captioner.readers import ReaderConfig, open_shards

    return {s.key: s.org_caption for shard in open_shards(source, ReaderConfig(**cfg)) for s in shard.samples()}


def _hf_reader(folder, **cfg) -> dict:
    return _reader_captions("webdataset", format="hf", hf_data_files=str(folder / "*.tar"), **cfg)


@pytest.mark.parametrize("spec", [None, "json:org_caption", "txt", "json:name"])
def test_captioner_reads_the_same_caption_through_the_hf_webdataset_route(real_shards, spec):
    folder = real_shards["jpg"]
    tar_route, hf_route = _reader_captions(str(folder), caption_column=spec), _hf_reader(folder, caption_column=spec)
    assert tar_route == hf_route and len(tar_route) == 5
    names = {key: name for name, (key, _) in shard_by_name(folder).items()}
    want = {None: ORG, "json:org_caption": ORG, "txt": RECAP, "json:name": "{}"}[spec]
    assert tar_route == {key: want.format(name) for key, name in names.items()}


def _trainer_captions(src) -> dict:
    out = {}
    for i in range(len(src.shards)):
        for rec in src.records(i):
            ex = src.decode(rec)
            out[rec.key] = (ex["original"], ex["recaption"], ex["pixels"].sum().item())
    return out


def test_trainer_maps_json_org_caption_and_txt_alike_on_both_routes(real_shards):
    from t2i_recap.data import DataConfig, HFDatasetSource, WebDatasetSource

    folder = real_shards["jpg"]
    specs = dict(original_caption="json:org_caption", recaption="txt", resolution=16)
    tar_route = _trainer_captions(WebDatasetSource(DataConfig(shards=str(folder), **specs)))
    hf_route = _trainer_captions(HFDatasetSource(DataConfig(hf_dataset="webdataset",
                                                            hf_data_files=[str(folder / "00000.tar")], **specs)))
    assert tar_route.keys() == hf_route.keys() and len(tar_route) == 5
    for key, (original, recaption, pixel_sum) in tar_route.items():
        assert hf_route[key][:2] == (original, recaption)
        assert hf_route[key][2] == pytest.approx(pixel_sum)
        assert original.startswith("org caption of") and recaption.startswith("recaption of")


@pytest.mark.parametrize("spec", ["column:json", "json"])
def test_the_whole_json_member_is_refused_as_a_caption(spec):
    from t2i_recap.captioner.readers import ReaderConfig
    from t2i_recap.data import DataConfig

    with pytest.raises(CaptionSpecError, match=r"json:FIELD") as err:
        DataConfig(shards="x", original_caption=spec)
    assert repr(spec) in str(err.value)
    with pytest.raises(CaptionSpecError, match=r"json:FIELD"):
        ReaderConfig(caption_column=spec)


def test_a_spec_that_finds_nothing_in_a_shard_stops_the_trainer_naming_spec_and_shard(real_shards):
    from t2i_recap.data import DataConfig, HFDatasetSource, WebDatasetSource

    folder = real_shards["jpg"]
    specs = dict(original_caption="json:alt_text", recaption="txt", resolution=16)
    with pytest.raises(CaptionSpecError, match=r"'json:alt_text'.*5 samples of shard '00000.tar'"):
        list(WebDatasetSource(DataConfig(shards=str(folder), **specs)).records(0))
    hf = HFDatasetSource(DataConfig(hf_dataset="webdataset", hf_data_files=[str(folder / "00000.tar")], **specs))
    with pytest.raises(CaptionSpecError, match=r"'json:alt_text'.*shard 'hf-00000"):
        next(hf.records(0))  # before any sample of the shard trains


def test_a_spec_that_finds_nothing_stops_the_captioner_naming_spec_and_shard(real_shards):
    folder = real_shards["jpg"]
    with pytest.raises(CaptionSpecError, match=r"'json:alt_text'.*00000.tar"):
        _reader_captions(str(folder), caption_column="json:alt_text")
    with pytest.raises(CaptionSpecError, match=r"'json:alt_text'.*shard '00000'"):
        _hf_reader(folder, caption_column="json:alt_text")
    # the default names no spec: a shard without alt-texts is captioned with none
    assert set(_reader_captions(str(real_shards["webp"]))) and None not in _reader_captions(str(real_shards["webp"])).values()


def test_hf_webdataset_sidecars_are_named_as_the_tars_and_join_them(real_shards, tmp_path):
    from test_reliability_bad_input import EchoBackend

    from t2i_recap.captioner.readers import ReaderConfig, open_shards
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.data import DataConfig, WebDatasetSource

    folder = real_shards["png"]
    reader = ReaderConfig(format="hf", hf_data_files=str(folder / "*.tar"))
    assert [s.name for s in open_shards("webdataset", reader)] == [s.name for s in open_shards(str(folder))] == ["00000"]
    summary = caption_run(CaptionRunConfig(input="webdataset", out=str(tmp_path / "recaps"), model="echo", reader=reader),
                          Dist(), EchoBackend())
    assert not summary["shards_failed"], summary
    assert sorted(p.name for p in (tmp_path / "recaps").glob("*.parquet")) == ["00000.parquet"]
    src = WebDatasetSource(DataConfig(shards=str(folder), recaption_dir=str(tmp_path / "recaps"), resolution=16,
                                      original_caption="json:org_caption", recaption="sidecar:re_caption"))
    examples = [src.decode(rec) for rec in src.records(0)]
    assert len(examples) == 3 and all(ex["recaption"].startswith("an image ") for ex in examples)
    assert all(ex["original"].startswith("org caption of") for ex in examples)


def test_train_stops_with_one_error_line_when_a_spec_finds_nothing(real_shards, train_assets, tmp_path, capsys):
    from fixtures_train import train_config_dict, write_config

    from t2i_recap.train import main

    cfg = train_config_dict(train_assets, real_shards["jpg"], tmp_path / "run")
    cfg["data"].update(original_caption="json:alt_text", recaption="txt")
    cfg["mixing"]["p"] = 1.0  # the paper's baseline: originals only, which this spec never finds
    assert main(["--config", str(write_config(tmp_path / "train.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "'json:alt_text'" in err and "'00000.tar'" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_prepare_stops_with_one_error_line_when_a_spec_finds_nothing(real_shards, train_assets, tmp_path, capsys):
    from fixtures_train import train_config_dict, write_config

    from t2i_recap.prepare import main

    cfg = train_config_dict(train_assets, real_shards["jpg"], tmp_path / "run")
    cfg["data"].update(original_caption="json:alt_text", recaption="txt")
    cfg["features"]["cache_dir"] = str(tmp_path / "cache")
    assert main(["--config", str(write_config(tmp_path / "train.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("t2i-recap prepare: error:"))
    assert "'json:alt_text'" in line and "'00000.tar'" in line
