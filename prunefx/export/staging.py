"""Staging and commit: a file appears at the target path only when every check passed.

Everything is written into a staging directory beside the target (same file system, so the
final rename is atomic); on any failure the directory is removed. With external data the
``.onnx`` and its ``.data`` are committed as a pair so that the ``.onnx`` at the target never
reads another export's data, whatever step fails (see ``_Staging``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prunefx.errors import ExportError

__all__: list[str] = []

log = logging.getLogger(__name__)

_TWO_GIB = 2**31 - 2**20  # protobuf's hard limit, less a margin for the graph itself


def _checked_target(path: Path) -> Path:
    path = path.expanduser()
    if path.is_dir():
        raise ExportError(f"cannot write the ONNX file to '{path}': it is a directory; pass a file path such as '{path / 'model.onnx'}'")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ExportError(f"cannot write the ONNX file '{path}': its directory '{parent}' {what}")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".prunefx-tmp", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write the ONNX file '{path}': {exc.strerror or exc} in '{parent}'; choose a writable directory") from exc
    os.rmdir(probe)
    return path.absolute()


class _Staging:
    """A directory beside the target, holding the file while it is made and checked; ``commit``
    renames it (and its external data) into place, leaving it removes everything else.

    The ``.onnx`` at the target and the ``.data`` beside it always come from the same export,
    whatever step fails: an ``.onnx`` with external data is committed by moving the old pair
    aside into the staging directory (the ``.onnx`` first: while it is away, no ``.onnx`` can
    meet the wrong data), then the new ``.data``, then the new ``.onnx``; a failure moves the
    old pair back (data first). A plain ``.onnx`` replaces the old one in one atomic rename, and
    a ``.data`` left by an earlier external-data export is then removed, not left stale."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.data_target: Path | None = None
        self.size = 0
        self.keep: Path | None = None  # the old pair, when putting it back failed: never deleted

    def __enter__(self) -> _Staging:
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".prunefx-tmp", dir=self.target.parent))
        except OSError as exc:
            raise ExportError(f"cannot write the ONNX file '{self.target}': {exc}") from exc
        self.file = self.dir / self.target.name
        return self

    def scratch(self) -> Path:
        return self.dir / "capture.onnx"

    def save(self, proto, external_data: bool | None) -> None:
        import onnx

        external = proto.ByteSize() > _TWO_GIB if external_data is None else external_data
        location = self.target.name + ".data"
        for stale in (self.scratch(), self.scratch().with_name("capture.onnx.data")):
            stale.unlink(missing_ok=True)
        try:
            onnx.save_model(proto, str(self.file), save_as_external_data=external, all_tensors_to_one_file=True, location=location, size_threshold=1024)
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot write the ONNX file '{self.target}': {exc}") from exc
        if external and (self.dir / location).exists():  # no tensor above the threshold: no data file
            self.data_target = self.target.with_name(location)

    def commit(self) -> None:
        data_at = self.target.with_name(self.target.name + ".data")
        if self.data_target is None:
            self._commit_plain(data_at)
        else:
            self._commit_pair(data_at)
        self.size = self.target.stat().st_size + (self.data_target.stat().st_size if self.data_target else 0)

    def _commit_plain(self, data_at: Path) -> None:
        try:
            os.replace(self.file, self.target)
        except OSError as exc:
            raise ExportError(f"cannot move the ONNX file into place at '{self.target}': {exc}") from exc
        try:
            if data_at.is_file():
                data_at.unlink()  # an earlier export's weights; the new file does not read them
        except OSError as exc:
            log.warning("prunefx.export_onnx: wrote %s but cannot remove the stale %s: %s", self.target, data_at, exc)

    def _commit_pair(self, data_at: Path) -> None:
        previous = self.dir / "previous"
        previous.mkdir()
        done: list[tuple[Path, Path]] = []  # renames made, undone in reverse order on failure
        steps = [(p, previous / p.name) for p in (self.target, data_at) if p.exists() or p.is_symlink()]
        steps += [(self.dir / data_at.name, data_at), (self.file, self.target)]
        try:
            for src, dst in steps:
                os.replace(src, dst)
                done.append((src, dst))
        except OSError as exc:
            kept = self._undo(done)
            where = f"; the previous export is kept in '{previous}'" if kept else ""
            raise ExportError(f"cannot move the ONNX file into place at '{self.target}': {exc}{where}") from exc

    def _undo(self, done: list[tuple[Path, Path]]) -> bool:
        """Put the old pair back (its data before its .onnx); True when that failed and the
        old pair must be kept where it is."""
        for src, dst in reversed(done):
            try:
                os.replace(dst, src)
            except OSError:
                self.keep = self.dir / "previous"
                return True
        return False

    def __exit__(self, *exc: Any) -> None:
        if self.keep is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for p in self.dir.iterdir():  # everything but the old pair
            if p == self.keep:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
