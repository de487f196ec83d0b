"""Which policy sampled a batch and how it scored: fingerprints, server weight versions and the
mean of each judged reward, counted as the records stream past (reported, never refused)."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator


class SampledBy:
    """Counts the `policy.fingerprint` and `policy.weight_version` of records as they stream past,
    and sums their judged `reward` and numeric `rewards` (accuracy, format…) for the batch's means."""

    def __init__(self) -> None:
        self.fingerprints: Counter = Counter()
        self.versions: Counter = Counter()
        self.reward_sums: dict[str, float] = {}
        self.reward_counts: Counter = Counter()

    def tally(self, located: Iterable) -> Iterator:
        for where, rec in located:
            pol = rec.get("policy") if isinstance(rec, dict) else None
            pol = pol if isinstance(pol, dict) else {}
            fp = pol.get("fingerprint")
            self.fingerprints[str(fp) if fp else "unknown"] += 1
            v = pol.get("weight_version")
            self.versions[str(v) if v is not None else "none"] += 1
            rewards = rec.get("rewards") if isinstance(rec, dict) else None
            rewards = dict(rewards) if isinstance(rewards, dict) else {}
            if isinstance(rec, dict) and "reward" in rec:
                rewards["reward"] = rec["reward"]  # the scalar the advantage came from
            for name, value in rewards.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                    self.reward_sums[name] = self.reward_sums.get(name, 0.0) + float(value)
                    self.reward_counts[name] += 1
            yield where, rec

    def report(self, fingerprint: str | None) -> dict:
        """{fingerprints, weight_versions, other_policy}: other_policy counts records known to be sampled by another checkpoint."""
        return {"fingerprints": dict(self.fingerprints), "weight_versions": dict(self.versions),
                "other_policy": sum(n for fp, n in self.fingerprints.items() if fp not in (str(fingerprint), "unknown"))}

    def rewards(self) -> dict:
        """The batch's mean of each judged reward ({} when no record was judged)."""
        return {name: total / self.reward_counts[name] for name, total in sorted(self.reward_sums.items())}
