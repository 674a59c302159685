"""The conversion cache: built once, reused, never reused when interrupted or outdated."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfit.models import convert


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDFIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"1234")
    return path


class Builder:
    """Counts builds; can fail half-way, after writing a partial file."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, src: Path, folder: Path) -> None:
        self.calls += 1
        (folder / "model.safetensors").write_bytes(src.read_bytes())
        if self.fail:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion


def test_built_once_then_reused(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = Builder()
    first = convert.cached_folder("m", source, build)
    assert "first use only" in capsys.readouterr().err
    second = convert.cached_folder("m", source, build)
    assert first == second and build.calls == 1
    assert (first / "model.safetensors").read_bytes() == b"1234"
    assert capsys.readouterr().err == ""


def test_interrupted_build_is_not_reused(source: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        convert.cached_folder("m", source, Builder(fail=True))
    root = source.parent / "cache" / "models"
    assert not (root / "m").exists()
    assert not list(root.glob(".m.tmp*"))  # partial output removed
    build = Builder()
    convert.cached_folder("m", source, build)
    assert build.calls == 1


def test_leftover_temporary_folders_are_cleared(source: Path) -> None:
    root = source.parent / "cache" / "models"
    (root / ".m.tmp_killed").mkdir(parents=True)  # a process killed with SIGKILL left this
    convert.cached_folder("m", source, Builder())
    assert not (root / ".m.tmp_killed").exists()


def test_changed_source_or_missing_manifest_rebuilds(source: Path) -> None:
    build = Builder()
    folder = convert.cached_folder("m", source, build)
    source.write_bytes(b"123456")  # the package was upgraded
    convert.cached_folder("m", source, build)
    assert build.calls == 2 and (folder / "model.safetensors").read_bytes() == b"123456"
    (folder / convert.MANIFEST).unlink()
    convert.cached_folder("m", source, build)
    assert build.calls == 3
