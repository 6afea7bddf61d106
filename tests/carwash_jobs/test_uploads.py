"""carwash_jobs/uploads.py: an upload's own directory under files_dir, and its durable copy
(which a rerun gets). The upload route's own behaviour is tested through HTTP in
tests/endpoints/test_tasks.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from carwash_jobs.uploads import copy_upload, is_upload, remove_upload

if TYPE_CHECKING:
    from pathlib import Path


def an_upload(files: Path) -> Path:
    path = files / ("a" * 32) / "employees.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"employee_no\r\n1\r\n\xef\xbb\xbf")
    return path


def read(path: Path) -> bytes:
    return path.read_bytes()


async def test_a_copy_is_the_same_file_in_a_new_directory_of_its_own(tmp_path: Path) -> None:
    files = tmp_path / "files"
    path = an_upload(files)

    copy = await copy_upload(path, str(files))

    assert copy.is_absolute()
    assert copy.name == path.name
    assert copy.parent != path.parent
    assert is_upload(copy, files)
    assert read(copy) == read(path)
    await remove_upload(copy)
    assert not copy.parent.exists()
    assert path.exists()


async def test_a_copy_of_a_file_that_is_gone_raises_and_leaves_nothing(tmp_path: Path) -> None:
    files = tmp_path / "files"
    path = an_upload(files)
    path.unlink()

    with pytest.raises(FileNotFoundError):
        await copy_upload(path, str(files))

    assert [p.name for p in files.iterdir()] == ["a" * 32]


def test_only_a_file_in_a_directory_right_under_files_dir_is_an_upload(tmp_path: Path) -> None:
    files = tmp_path / "files"
    assert is_upload(files / "x" / "a.csv", files)
    assert is_upload(files / "x" / ".." / "y" / "a.csv", files)  # as it resolves
    assert not is_upload(files / "a.csv", files)
    assert not is_upload(files / "x" / "y" / "a.csv", files)
    assert not is_upload(tmp_path / "elsewhere" / "x" / "a.csv", files)
