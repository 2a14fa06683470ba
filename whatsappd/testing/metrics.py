"""Reading the daemon's metrics in tests and benchmarks: parsed with prometheus_client's own
parser (what a Prometheus user's tooling does), never matched as text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["metric_value", "samples"]


def samples(text: str) -> list[Sample]:
    """Every sample of an exposition in text format 0.0.4."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample named name whose labels include labels (None if none)."""
    found = [s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}"
    return found[0] if found else None
