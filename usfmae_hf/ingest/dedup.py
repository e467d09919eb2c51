"""De-duplication of a build: exact (pixel SHA-256) and near (perceptual-hash Hamming distance).

A frame is a duplicate when its pixel SHA-256 (:func:`usfmae_hf.io.hashing.pixel_sha256` of the
decoded, full-size frame) was already kept (exact duplicate), or when its 64-bit perceptual hash
(``imagehash.phash`` of the full-size frame) is within ``near_dup_threshold`` bits of a kept one
(near duplicate). Frames are offered in a fixed order, and the first one kept wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["Deduplicator", "NearDuplicateIndex"]


class NearDuplicateIndex:
    """Greedy near-duplicate filter over 64-bit perceptual hashes.

    The 64 bits are cut into ``threshold + 1`` bands: two hashes within ``threshold`` bits of each other
    agree exactly on at least one band (pigeonhole), so a lookup compares a hash only with the kept
    hashes sharing a band value instead of with all of them, and still finds every match.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        bands = threshold + 1
        self._bands = [(64 * i // bands, 64 * (i + 1) // bands) for i in range(bands)]
        self._tables: list[dict[int, list[tuple[int, Any]]]] = [{} for _ in self._bands]

    def _keys(self, value: int) -> Iterator[int]:
        for start, stop in self._bands:
            yield (value >> start) & ((1 << (stop - start)) - 1)

    def find(self, value: int) -> tuple[Any, int] | None:
        """The reference and distance of a kept hash within the threshold of ``value``, or ``None``."""
        for table, key in zip(self._tables, self._keys(value)):
            for other, reference in table.get(key, ()):
                distance = (value ^ other).bit_count()
                if distance <= self.threshold:
                    return reference, distance
        return None

    def add(self, value: int, reference: Any) -> None:
        """Keep ``value`` (with a reference reported for its future duplicates)."""
        for table, key in zip(self._tables, self._keys(value)):
            table.setdefault(key, []).append((value, reference))


class Deduplicator:
    """The kept frames of a build, by pixel SHA-256 and (unless ``near_dup_threshold`` is ``None``) phash.

    A kept frame is referred to as ``{"dataset", "path", "frame"}``; ``phash`` is the hexadecimal
    string of ``imagehash.phash``.
    """

    def __init__(self, near_dup_threshold: int | None) -> None:
        self.exact: dict[str, dict[str, Any]] = {}
        self.near = None if near_dup_threshold is None else NearDuplicateIndex(near_dup_threshold)

    def keep(self, dataset: str, path: str, frame: int, sha: str, phash: str) -> None:
        """Record a kept frame, so that later copies of it are found as its duplicates."""
        reference = {"dataset": dataset, "path": path, "frame": frame}
        self.exact[sha] = reference
        if self.near is not None:
            self.near.add(int(phash, 16), reference)

    def duplicate_of(self, sha: str, phash: str) -> dict[str, Any] | None:
        """``{"kind": "exact"|"near", "duplicate_of": reference[, "distance": bits]}``, or ``None`` if new."""
        if sha in self.exact:
            return {"kind": "exact", "duplicate_of": self.exact[sha]}
        if self.near is not None and (hit := self.near.find(int(phash, 16))) is not None:
            return {"kind": "near", "duplicate_of": hit[0], "distance": hit[1]}
        return None
