"""Sizes as users write them ("80GB", "1.5 TiB", "512G") and as dtrain prints them: one parser, one formatter."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes from "80GB", "1TB", "24GiB", "1.5 TB", "512G" or a plain number of bytes; raises ValueError.

    kB/MB/GB/TB are decimal (10^9), as transformers reads max_shard_size; KiB/MiB/GiB/TiB binary (2^30); a bare
    K/M/G/T is binary, as in Slurm's --mem. An "80GB" GPU has 80 GiB: passing 80GB understates it by 7 %, which
    leaves headroom. Zero and negative sizes are refused: no size a user gives dtrain can be empty."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"size {text!r}: expected a number with a unit such as 80GB, 1TB, 24GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r}: must be more than 0 bytes")
    return value


def format_bytes(n: float) -> str:
    """Decimal units, three significant digits: 0, 512 MB, 80.0 GB, 1.13 TB."""
    if n < 0.5:
        return "0"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"
    return f"{int(n)} B"
