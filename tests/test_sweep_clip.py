"""`t2i-recap clip sweep`: one tiny CLIP per p, each scored by `eval retrieval`, then a table and a figure."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from t2i_recap import sweep as sweep_mod
from t2i_recap.cli import main as cli_main
from t2i_recap.clip import sweep
from t2i_recap.config import from_dict

TINY = ["model.num_layers=1", "model.hidden_size=32", "model.text_hidden_size=32", "model.projection_dim=32",
        "model.num_heads=2", "model.text_num_heads=2", "optim.warmup_steps=1"]


def _in_process(monkeypatch):
    """Child commands run in this process (the same `main(argv)` the child would run), to save the
    interpreter start-up of each."""
    calls = []

    def run(argv, threads=None):
        calls.append(argv)
        assert cli_main(list(argv)) == 0, argv

    monkeypatch.setattr(sweep, "run_command", run)
    return calls


def _cfg(**kw):
    base = dict(p_values=[0.0, 1.0], steps=4, batch_size=8, num_samples=64, retrieval_n=10, overrides=TINY)
    return from_dict(sweep.ClipSweepConfig, base | kw)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    calls = _in_process(mp)
    out = tmp_path_factory.mktemp("clip_sweep") / "sweep"
    sweep.ClipSweep(_cfg(), out).run()
    yield out, calls
    mp.undo()


@pytest.mark.slow
def test_sweep_trains_and_scores_each_p_and_writes_table_and_figure(tiny_sweep):
    out, calls = tiny_sweep
    assert [a[:2] for a in calls] == [["clip", "train"], ["eval", "retrieval"]] * 2
    result = json.loads((out / "report.json").read_text())
    assert result["kind"] == "t2i-recap clip sweep" and result["recaptions"]["source"] == "gold"
    assert [r["p"] for r in result["rows"]] == [0.0, 1.0] and result["same_suite"]
    for row in result["rows"]:
        retrieval = json.loads((out / "runs" / sweep.p_name(row["p"]) / "retrieval" / "report.json").read_text())
        assert row["retrieval"]["t2i_r1"] == retrieval["metrics"]["retrieval"]["t2i_r1"]  # read, not recomputed
        assert row["classification"]["shape"]["chance"] == pytest.approx(1 / 3)
        for entry in (*row["retrieval"].values(), *row["long"].values(), *row["classification"].values()):
            assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
    # the mix really followed p: recaptions only at p = 0, originals only at p = 1
    mixes = {p: json.loads((out / "stages" / f"train_{p}.json").read_text())["summary"]["mix_counts"]
             for p in ("p0_00", "p1_00")}
    assert mixes["p0_00"]["original"] == 0 and mixes["p0_00"]["recaption"] == 4 * 8
    assert mixes["p1_00"]["recaption"] == 0 and mixes["p1_00"]["original"] == 4 * 8
    md = (out / "report.md").read_text()
    assert "gold dense captions" in md and "| p | i2t R@1 |" in md and "colour+shape (chance 0.056)" in md
    assert sweep_mod.fmt_ci(result["rows"][0]["retrieval"]["i2t_r1"]) in md
    with Image.open(out / "report.png") as img:
        assert img.format == "PNG" and img.width > 600


@pytest.mark.slow
def test_rerun_skips_finished_stages(tiny_sweep, monkeypatch):
    out, _ = tiny_sweep
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    calls = _in_process(monkeypatch)
    sweep.ClipSweep(_cfg(), out).run()
    assert calls == []
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == before


def test_interrupted_run_with_other_settings_is_refused(tmp_path):
    from t2i_recap.clip.config import ClipTrainConfig
    from t2i_recap.config import load_config, save_config

    first = sweep.ClipSweep(_cfg(), tmp_path)
    overrides = ["mixing.p=0.0", f"trainer.run_dir={first.run_dir(0.0)}"]
    save_config(load_config(ClipTrainConfig, first.base_config(), overrides), first.run_dir(0.0) / "config.yaml")
    first._check_same_run(first.run_dir(0.0), load_config(ClipTrainConfig, first.base_config(), overrides))
    for changed, key in ((dict(lr=1e-3), "optim.lr"), (dict(steps=8), "trainer.max_steps")):
        later = sweep.ClipSweep(_cfg(**changed), tmp_path)
        cfg = load_config(ClipTrainConfig, later.base_config(), overrides)
        with pytest.raises(SystemExit, match=key):
            later._check_same_run(later.run_dir(0.0), cfg)


def test_demo_source_needs_its_shards_and_sidecars(tmp_path):
    (tmp_path / "demo" / "data" / "web").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no web shards"):
        sweep.ClipSweep(_cfg(demo=str(tmp_path / "demo")), tmp_path / "out").run()
    (tmp_path / "demo" / "data" / "web" / "00000.tar").write_bytes(b"")
    with pytest.raises(SystemExit, match="no recaption sidecars"):
        sweep.ClipSweep(_cfg(demo=str(tmp_path / "demo")), tmp_path / "out").data_paths()
    (tmp_path / "demo" / "recaptions").mkdir()
    (tmp_path / "demo" / "recaptions" / "00000.parquet").write_bytes(b"")
    paths = sweep.ClipSweep(_cfg(demo=str(tmp_path / "demo")), tmp_path / "out").data_paths()
    assert paths["source"] == "captioner" and paths["recaption"] == "sidecar:re_caption"


def test_flags_and_config_checks():
    from t2i_recap.cli_config import config_from_args

    parser = sweep.build_parser()
    args = parser.parse_args(["--p", "0,0.2", "--p", "1", "--out", "o", "--clip-set", "model.num_layers=1"])
    cfg = config_from_args(sweep.ClipSweepConfig, args)
    assert cfg.p_values == [0.0, 0.2, 1.0] and cfg.overrides == ["model.num_layers=1"]
    for bad in ("0,1.5", "0.2,0.2"):
        with pytest.raises(SystemExit) as exc:
            sweep.main(["--p", bad, "--out", "unused"])
        assert exc.value.code == 2
    with pytest.raises(ValueError, match="retrieval_n"):
        _cfg(retrieval_n=5)
    assert sweep_mod.best_p([(0.0, {"mean": 0.5}), (0.5, {"mean": 0.7}), (1.0, {"mean": 0.7})]) == 0.5
    assert sweep_mod.best_p([(0.0, None), (1.0, {"mean": None})]) is None
