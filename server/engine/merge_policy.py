"""Which adapter, if any, to keep merged into the base weights: a pure function of demand, modes and time.

Each adapter has a mode. `unmerged` (the default) is never merged. `merged` marks a latency-critical adapter: it is
merged as soon as it has requests and nothing else is merged, and stays merged while idle unless another adapter
claims the merge. `auto` follows dLoRA: an adapter is merged once its share of the running and waiting requests
(base-model requests count in the total) reaches `merge_share`, and unmerged once it falls below `unmerge_share`.

At most one adapter is merged. Adapters in `merged` mode with requests outrank `auto` ones; among them, the one
with the most requests wins, but a challenger must lead the merged one by `merge_share - unmerge_share` of all
requests. Every change of choice must hold for `window_s` seconds before the engine swaps, so brief bursts cause no
flapping; two changes take effect at once: merging a `merged`-mode adapter when nothing is merged, and unmerging an
adapter whose mode was set to `unmerged`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from server.adapters.versions import adapter_name
from server.settings import Settings

MergeMode = Literal["unmerged", "merged", "auto"]
MERGE_MODES: tuple[MergeMode, ...] = ("unmerged", "merged", "auto")
ModeOf = Callable[[str], MergeMode]


@dataclass(frozen=True)
class MergePolicyConfig:
    """Thresholds of the `auto` mode and the hysteresis window of every swap."""

    merge_share: float = 0.6  # share of all requests at which an auto adapter is merged
    unmerge_share: float = 0.4  # share below which a merged auto adapter is unmerged
    window_s: float = 1.0  # how long a new choice must hold before the swap

    def __post_init__(self) -> None:
        if not 0.0 <= self.unmerge_share <= self.merge_share <= 1.0:
            raise ValueError(
                f"need 0 <= unmerge_share <= merge_share <= 1, got {self.unmerge_share} and {self.merge_share}"
            )
        if self.window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {self.window_s}")

    @property
    def band(self) -> float:
        return self.merge_share - self.unmerge_share

    @classmethod
    def from_settings(cls, settings: Settings) -> MergePolicyConfig:
        return cls(settings.merge_share, settings.unmerge_share, settings.merge_window_s)


def start_modes(settings: Settings, stored: ModeOf) -> ModeOf:
    """Modes given at start (`--merged`, `--auto-merge`: adapter names) over the `stored` ones (admin API).

    `merged` wins for a name given to both flags. Adapters are looked up by name or by key (`name@version`).
    """
    merged, auto = frozenset(settings.merged), frozenset(settings.auto_merge)

    def mode_of(adapter: str) -> MergeMode:
        name = adapter_name(adapter)
        return "merged" if name in merged else "auto" if name in auto else stored(adapter)

    return mode_of


@dataclass(frozen=True)
class Demand:
    """Running plus waiting requests per adapter, and of every request (base model included)."""

    per_adapter: Mapping[str, int]
    total: int

    def share(self, name: str | None) -> float:
        return self.per_adapter.get(name, 0) / self.total if name is not None and self.total else 0.0


class MergePolicy:
    """Turns each step's demand into the adapter that should be merged, with hysteresis; holds no model state."""

    def __init__(self, config: MergePolicyConfig, mode_of: ModeOf) -> None:
        self.config = config
        self.mode_of = mode_of
        self.refused: set[str] = set()  # adapters whose merge failed; never proposed again
        self._pending: tuple[str | None, float] | None = None  # a choice other than the merged one, and since when

    def refuse(self, name: str) -> None:
        self.refused.add(name)

    def decide(self, demand: Demand, merged: str | None, now: float) -> str | None:
        """The adapter to have merged after this step's swap (None: none); `merged` is the one merged now."""
        target = self._target(demand, merged)
        if target == merged:
            self._pending = None
            return merged
        if self._immediate(target, merged):
            self._pending = None
            return target
        if self._pending is None or self._pending[0] != target:
            self._pending = (target, now)
        if now - self._pending[1] >= self.config.window_s:
            self._pending = None
            return target
        return merged

    def _immediate(self, target: str | None, merged: str | None) -> bool:
        first_pinned = merged is None and target is not None and self._mode(target) == "merged"
        return first_pinned or (merged is not None and self._mode(merged) == "unmerged")

    def _mode(self, name: str) -> MergeMode:
        return "unmerged" if name in self.refused else self.mode_of(name)

    def _target(self, demand: Demand, merged: str | None) -> str | None:
        """The adapter to merge if the choice were made now, hysteresis against the merged one included."""
        pinned = self._busiest(demand, "merged")
        if pinned is not None:
            if merged is not None and self._mode(merged) == "merged" and demand.per_adapter.get(merged, 0) > 0:
                lead = demand.share(pinned) - demand.share(merged)
                if lead <= 0 or lead < self.config.band:
                    return merged
            return pinned
        merged_mode = None if merged is None else self._mode(merged)
        if merged_mode == "auto" and demand.share(merged) >= self.config.unmerge_share:
            return merged
        auto = self._busiest(demand, "auto")
        if auto is not None and demand.share(auto) >= self.config.merge_share:
            return auto
        return merged if merged_mode == "merged" else None

    def _busiest(self, demand: Demand, mode: MergeMode) -> str | None:
        """The adapter of `mode` with the most requests (ties: first by name); None if none has any."""
        counts = [(-n, name) for name, n in demand.per_adapter.items() if n > 0 and self._mode(name) == mode]
        return min(counts)[1] if counts else None
