"""One Prometheus exposition from several: the replicas' texts, whose samples carry a `replica` label each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class _Families:
    """A collector that yields the families it was given (what `generate_latest` reads)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(texts: Iterable[bytes]) -> bytes:
    """The samples of every text under one HELP/TYPE header per family (Prometheus rejects a repeated family)."""
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(family.samples)
    return generate_latest(_Families(list(families.values())))
