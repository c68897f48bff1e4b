"""The settings grammar shared by every command: ``W<b>A<b>[KV<b>][g<G>|ch][sym|asym]``.

Examples: ``W4A8`` (per output channel, symmetric), ``W3A16g128asym``, ``W4A16chsym``,
``W4A4KV4`` (the KV cache in 4 bits too, :mod:`qe.quantizers.kv_cache`).
Defaults (docs/cli.md, settings grammar): weight-activation settings are per-channel symmetric;
weight-only settings (A16) are g128 asymmetric; the KV cache stays in full precision.
``group_size == 0`` means per output channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qe.errors import ConfigError

WEIGHT_BITS = range(2, 9)
ACTIVATION_BITS = (4, 5, 6, 7, 8, 16)
KV_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
SETTING_FORMS = "W<bits>A<bits>[KV<bits>][g<group>|ch][sym|asym], e.g. W4A8, W4A6, W3A16g128asym, W4A16chsym, W4A4KV4"

_PATTERN = re.compile(r"^W(\d+)A(\d+)(?:KV(\d+))?(?:(ch)|g(\d+))?(sym|asym)?$", re.IGNORECASE)


@dataclass(frozen=True)
class QuantSetting:
    """Weight and activation precision of one composition."""

    w_bits: int
    a_bits: int = 16
    group_size: int = 0  # 0: one scale per output channel
    symmetric: bool = True
    kv_bits: int = 16  # the KV cache's bits; 16: not quantized

    def __post_init__(self) -> None:
        if self.w_bits not in WEIGHT_BITS and self.w_bits != 16:
            raise ConfigError(f"weight bits {self.w_bits} unsupported: use 2 to 8 (or 16 for none)")
        if self.a_bits not in ACTIVATION_BITS:
            raise ConfigError(
                f"activation bits {self.a_bits} unsupported: use one of 4, 5, 6, 7, 8 or 16 (none)"
            )
        if self.kv_bits not in KV_BITS:
            raise ConfigError(f"KV-cache bits {self.kv_bits} unsupported: use 2 to 8 (or leave KV out for none)")
        if self.group_size < 0:
            raise ConfigError(f"group size {self.group_size} is negative: use 0 (per channel) or a positive size")

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < 16

    @property
    def quantizes_kv_cache(self) -> bool:
        return self.kv_bits < 16

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def name(self) -> str:
        gran = "ch" if self.group_size == 0 else f"g{self.group_size}"
        return f"W{self.w_bits}A{self.a_bits}{self._kv}{gran}{'sym' if self.symmetric else 'asym'}"

    @property
    def _kv(self) -> str:
        return f"KV{self.kv_bits}" if self.quantizes_kv_cache else ""

    @property
    def short_name(self) -> str:
        """The shortest string that parses back to this setting."""
        short = f"W{self.w_bits}A{self.a_bits}{self._kv}"
        if parse_setting(short) == self:
            return short
        return self.name

    def with_overrides(
        self, w_bits: int | None = None, a_bits: int | None = None, group_size: int | None = None
    ) -> QuantSetting:
        """Apply the explicit ``--w-bits/--a-bits/--group-size`` flags."""
        changes = {k: v for k, v in dict(w_bits=w_bits, a_bits=a_bits, group_size=group_size).items() if v is not None}
        return replace(self, **changes)

    def __str__(self) -> str:
        return self.short_name


def parse_setting(text: str) -> QuantSetting:
    """Parse a setting string; raise :class:`ConfigError` naming the accepted forms."""
    m = _PATTERN.match(text.strip())
    if not m:
        raise ConfigError(f"unknown setting {text!r}: the forms are {SETTING_FORMS}")
    w_bits, a_bits = int(m.group(1)), int(m.group(2))
    kv_bits = int(m.group(3)) if m.group(3) is not None else 16
    if m.group(3) is not None and kv_bits >= 16:
        raise ConfigError(f"KV-cache bits {kv_bits} in {text!r}: use 2 to 8, or leave KV<bits> out for a full-precision cache")
    per_channel, group, sym = m.group(4), m.group(5), m.group(6)
    weight_only = a_bits >= 16
    if per_channel:
        group_size = 0
    elif group is not None:
        group_size = int(group)
        if group_size < 1:
            raise ConfigError(f"group size in {text!r} must be at least 1 (or use 'ch' for per channel)")
    else:
        group_size = 128 if weight_only else 0
    symmetric = (sym.lower() == "sym") if sym else (not weight_only)
    return QuantSetting(w_bits=w_bits, a_bits=a_bits, group_size=group_size, symmetric=symmetric, kv_bits=kv_bits)


def parse_settings(text: str) -> list[QuantSetting]:
    """A comma-separated list of settings."""
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise ConfigError(f"no setting given: the forms are {SETTING_FORMS}")
    return [parse_setting(t) for t in items]
