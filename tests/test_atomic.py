"""`bridge.atomic`: the streamed rewrite of a file's head, and when it leaves the file alone."""

from __future__ import annotations

from pathlib import Path

from bridge import atomic


def test_the_head_is_replaced_and_the_rest_streamed_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "request.tmp"
    rest = bytes(range(256)) * 10_000  # several copy blocks
    path.write_bytes(b"HEAD-OLD\n" + rest)
    sizes: list[int] = []

    def answer(size: int) -> tuple[bytes, int]:
        sizes.append(size)
        return b"new head\n", len(b"HEAD-OLD\n")

    assert atomic.rewrite_head(path, b"HEAD-OLD\n", answer) == atomic.REWRITTEN
    assert path.read_bytes() == b"new head\n" + rest
    assert sizes == [len(b"HEAD-OLD\n") + len(rest)]
    assert [p.name for p in tmp_path.iterdir()] == ["request.tmp"]  # no dot-file left


def test_a_file_that_no_longer_starts_with_the_head_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "request.tmp"
    path.write_bytes(b"the writer's new request\n")
    result = atomic.rewrite_head(path, b"HEAD-OLD\n", lambda size: (b"new head\n", 9))
    assert result == atomic.CHANGED
    assert path.read_bytes() == b"the writer's new request\n"
    assert [p.name for p in tmp_path.iterdir()] == ["request.tmp"]


def test_a_file_gone_meanwhile_is_reported_not_raised(tmp_path: Path) -> None:
    result = atomic.rewrite_head(tmp_path / "gone.tmp", b"HEAD", lambda size: (b"x", 4))
    assert result == atomic.GONE
    assert list(tmp_path.iterdir()) == []
