"""Sizes as users write them: one parser for hardware flags, cluster profiles and export shard sizes."""

from __future__ import annotations

import pytest

from dtrain.units import format_bytes, parse_size


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("200KB") == 200_000
    assert parse_size("1TB") == 10**12 and parse_size("1.5 TB") == 1_500_000_000_000
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("1MiB") == 2**20
    assert parse_size("512G") == 512 * 2**30  # bare letters are binary, as Slurm's --mem
    assert parse_size("1000") == 1000 and parse_size(123) == 123


@pytest.mark.parametrize("bad", ["", "80 gigs", "GB", "-1GB", "lots", "0", "0GB", 0, -5, True])
def test_parse_size_refuses_what_is_no_size(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 512e6, 80e9, 1.13e12, 999)] == ["0", "512 MB", "80.0 GB", "1.13 TB", "999 B"]
