"""The conversion report: returned by convert_checkpoint, printed by the CLI, saved as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_NAME = "conversion_report.json"


@dataclass(frozen=True)
class ConversionReport:
    source: str
    destination: str
    family: str
    layout: str
    method: str
    num_layers: int
    num_query_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    shards: int
    tensors_rewritten: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float
    megabytes_per_second: float
    verification: str
    verified: str
    stock_loadable: bool
    config_changes: dict[str, list] = field(default_factory=dict)
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Calibrated methods: {"source", "sequences", "tokens", "seconds"}; None for the others.
    calibration: dict | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few lines for a person at a terminal."""
        changes = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in self.config_changes.items())
        lines = [
            f"converted {self.family} ({self.layout}): {self.kv_heads_before} -> {self.kv_heads_after} "
            f"KV heads for {self.num_query_heads} query heads, {self.num_layers} layers, "
            f"method {self.method!r}",
            f"  {self.source} -> {self.destination}",
            f"  {self.shards} shard(s), {self.tensors_rewritten} tensors rewritten, "
            f"{self.tensors_copied} copied; {self.bytes_read / 1e6:.1f} MB read, "
            f"{self.bytes_written / 1e6:.1f} MB written in {self.seconds:.1f} s "
            f"({self.megabytes_per_second:.0f} MB/s)",
            f"  config: {changes}",
            f"  verified: {self.verified}",
        ]
        if self.calibration:
            lines.append(
                f"  calibration: {self.calibration['tokens']} tokens in {self.calibration['sequences']} "
                f"sequences ({self.calibration['source']}), {self.calibration['seconds']:.1f} s"
            )
        if self.skipped_files:
            lines.append(f"  left out (other weight formats, hidden entries): {', '.join(self.skipped_files)}")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  report: {Path(self.destination) / REPORT_NAME}")
        return "\n".join(lines)
