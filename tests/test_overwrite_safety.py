"""Nothing destructive by accident: `--overwrite` replaces only a folder this project wrote for that
purpose (its marker file says so), never a run, a folder holding one, or a user's folder; outputs get
the umask's file modes (weights too); a full disk gives one line and leaves no temporary folder."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fixtures_train import train_config_dict
from t2i_recap import io
from t2i_recap.config import from_dict
from t2i_recap.export import main as export_main
from t2i_recap.train_config import TrainConfig
from t2i_recap.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
UMASK = os.umask(0)
os.umask(UMASK)


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_assets, train_shards):
    """A 1-step training run in WORK/project/run (the parent holds nothing else of value but it)."""
    shards, side = train_shards
    run_dir = tmp_path_factory.mktemp("work") / "project" / "run"
    train(from_dict(TrainConfig, train_config_dict(
        train_assets, shards, run_dir, side, trainer={"max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
        checkpoint={"every_steps": 1}, validation={"every_steps": -1})))
    return run_dir


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _export(run: Path, out: Path, *extra: str) -> int:
    return export_main(["--run", str(run), "--out", str(out), *extra])


def _one_error_line(capsys, starts: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("t2i-recap export:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"t2i-recap export: {starts}"), lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["run", "parent", "checkpoint", "link"])
def test_overwrite_never_removes_the_run(run, tmp_path, capsys, where):
    before = _snapshot(run)
    out = {"run": run, "parent": run.parent, "checkpoint": run / "checkpoints",
           "link": tmp_path / "link"}[where]
    if where == "link":
        out.symlink_to(run, target_is_directory=True)
    assert _export(run, out, "--overwrite") == 1
    line = _one_error_line(capsys, f"refusing to replace {out}")
    assert str(run.resolve()) in line
    assert _snapshot(run) == before and (run / "checkpoints").is_dir()
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_overwrite_refuses_a_folder_without_the_marker(run, tmp_path, capsys):
    mine = tmp_path / "my-models"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub/notes.txt").write_text("keep me")
    assert _export(run, mine, "--overwrite") == 1
    assert io.OUTPUT_MARKER in _one_error_line(capsys, f"refusing to replace {mine}: it has no")
    assert (mine / "sub/notes.txt").read_text() == "keep me"
    (mine / io.OUTPUT_MARKER).write_text('{"written_by": "t2i-recap", "kind": "captioner"}')  # another kind
    assert _export(run, mine, "--overwrite") == 1
    _one_error_line(capsys, f"refusing to replace {mine}")
    assert (mine / "sub/notes.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-models"]


def test_overwrite_replaces_an_earlier_export_only(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert _export(run, out) == 0
    assert io.read_marker(out) == "export"
    (out / "stale.txt").write_text("from the old export")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _export(run, out)
    assert _export(run, out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or set-aside folder left
    # an earlier export with a run put inside it is not replaced either
    (out / "inner-run/checkpoints").mkdir(parents=True)
    assert _export(run, out, "--overwrite") == 1
    _one_error_line(capsys, f"refusing to replace {out}: it holds a training run")
    assert (out / "inner-run/checkpoints").is_dir()


def test_export_files_get_the_umask_modes(run, tmp_path):
    out = tmp_path / "export"
    assert _export(run, out) == 0
    weights = list(out.rglob("*.safetensors"))
    assert weights
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~UMASK
        assert mode == want, f"{p}: {oct(mode)}, expected {oct(want)}"


def _save_on_a_full_disk(self, path, **_):
    """ModelMixin.save_pretrained as a full disk runs it: part of the weights written, then ENOSPC."""
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_export_on_a_full_disk_gives_one_line_and_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    from diffusers import ModelMixin

    out = tmp_path / "export"
    assert _export(run, out) == 0
    before = _snapshot(out)
    monkeypatch.setattr(ModelMixin, "save_pretrained", _save_on_a_full_disk)
    assert _export(run, out, "--overwrite") == 1
    line = _one_error_line(capsys, "[Errno 28] no space left on the device")
    assert f"{out} is unchanged" in line
    assert _snapshot(out) == before  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # and no temporary folder is left


def test_atomic_write_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    io.atomic_write_text(target, "old")
    real = Path.write_bytes

    def full(self, data):
        real(self, data[:2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(io.DiskFullError) as info:
        io.atomic_write_text(target, "new contents")
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value) and str(target) in str(info.value)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_replace_dir_rules(tmp_path):
    tmp = tmp_path / "new"
    tmp.mkdir()
    io.write_marker(tmp, "export")
    (tmp_path / "empty").mkdir()
    assert io.replace_dir(tmp, tmp_path / "empty", kind="export", overwrite=False) == tmp_path / "empty"  # nothing lost
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(io.RefusedOverwriteError, match="not a folder"):
        io.check_replaceable(tmp_path / "file.txt", kind="export", overwrite=True)
    with pytest.raises(io.RefusedOverwriteError, match="an input of this command"):
        io.check_replaceable(tmp_path, kind="export", overwrite=True, protect=[tmp_path / "empty"])


def test_caption_finetune_refuses_a_user_folder_before_training(tmp_path):
    from t2i_recap.captioner.finetune import finetune
    from t2i_recap.captioner.finetune_config import FinetuneConfig

    mine = tmp_path / "captioner"
    mine.mkdir()
    (mine / "weights.bin").write_bytes(b"mine")
    with pytest.raises(io.RefusedOverwriteError, match=f"refusing to replace {mine}"):
        finetune(FinetuneConfig(), mine)  # fails at once: no data was read, nothing trained
    assert (mine / "weights.bin").read_bytes() == b"mine"


def test_shapes_assets_refuse_a_user_part_folder(tmp_path):
    from t2i_recap.shapes.assets import build_assets

    out = tmp_path / "assets"
    (out / "clip").mkdir(parents=True)
    (out / "clip/config.json").write_text("{}")  # the user's own CLIP, not a part this command built
    with pytest.raises(io.RefusedOverwriteError, match=f"refusing to replace {out / 'clip'}"):
        build_assets(out)
    assert (out / "clip/config.json").read_text() == "{}"
    tok = out / "tokenizer"  # the part built before it: marked, with the umask's modes
    assert io.read_marker(tok) == "shapes-tokenizer"
    assert stat.S_IMODE(tok.stat().st_mode) == 0o777 & ~UMASK


def test_caption_sidecars_get_the_umask_mode(tmp_path):
    from t2i_recap.captioner.writer import write_sidecar

    path = tmp_path / "00000.parquet"
    write_sidecar(path, [], {"model": "x"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~UMASK
