"""Which policy sampled a batch: fingerprints and server weight versions, counted (reported, never refused)."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator


class SampledBy:
    """Counts the `policy.fingerprint` and `policy.weight_version` of records as they stream past."""

    def __init__(self) -> None:
        self.fingerprints: Counter = Counter()
        self.versions: Counter = Counter()

    def tally(self, located: Iterable) -> Iterator:
        for where, rec in located:
            pol = rec.get("policy") if isinstance(rec, dict) else None
            pol = pol if isinstance(pol, dict) else {}
            fp = pol.get("fingerprint")
            self.fingerprints[str(fp) if fp else "unknown"] += 1
            v = pol.get("weight_version")
            self.versions[str(v) if v is not None else "none"] += 1
            yield where, rec

    def report(self, fingerprint: str | None) -> dict:
        """{fingerprints, weight_versions, other_policy}: other_policy counts records known to be sampled by another checkpoint."""
        return {"fingerprints": dict(self.fingerprints), "weight_versions": dict(self.versions),
                "other_policy": sum(n for fp, n in self.fingerprints.items() if fp not in (str(fingerprint), "unknown"))}
