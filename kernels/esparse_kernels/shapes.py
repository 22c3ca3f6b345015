"""Linear shapes (out x in) of the benchmarked models, from their configs (DESIGN.md's table)."""

from __future__ import annotations

from dataclasses import dataclass

from esparse.errors import ConfigError


@dataclass(frozen=True)
class LinearShape:
    model: str
    layers: str  # which projections share this shape
    out_features: int
    in_features: int

    @property
    def name(self) -> str:
        return f"{self.model}.{self.layers}"


def _model(model: str, hidden: int, kv: int, inter: int) -> list[LinearShape]:
    shapes = [LinearShape(model, "q_o" if kv != hidden else "q_k_v_o", hidden, hidden)]
    if kv != hidden:
        shapes.append(LinearShape(model, "k_v", kv, hidden))
    shapes += [LinearShape(model, "gate_up", inter, hidden), LinearShape(model, "down", hidden, inter)]
    return shapes


MODEL_SHAPES: dict[str, list[LinearShape]] = {
    "smollm2-135m": _model("smollm2-135m", 576, 192, 1536),
    "llama-7b": _model("llama-7b", 4096, 4096, 11008),
    "llama-13b": _model("llama-13b", 5120, 5120, 13824),
    "llama-30b": _model("llama-30b", 6656, 6656, 17920),
    "llama-65b": _model("llama-65b", 8192, 8192, 22016),
}
ALL_SHAPES: list[LinearShape] = [s for shapes in MODEL_SHAPES.values() for s in shapes]


def select_shapes(spec: str | None) -> list[LinearShape]:
    """Comma-separated model names ("llama-7b"), shape names ("llama-7b.down") or "NxK"; None = all."""
    if not spec:
        return list(ALL_SHAPES)
    out: list[LinearShape] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in MODEL_SHAPES:
            out += MODEL_SHAPES[item]
        elif any(s.name == item for s in ALL_SHAPES):
            out += [s for s in ALL_SHAPES if s.name == item]
        elif "x" in item and all(p.isdigit() for p in item.split("x", 1)):
            n, k = (int(p) for p in item.split("x", 1))
            out.append(LinearShape("custom", item, n, k))
        else:
            allowed = ", ".join(list(MODEL_SHAPES) + [s.name for s in ALL_SHAPES])
            raise ConfigError(f"unknown shape {item!r}; allowed: {allowed}, or OUTxIN")
    seen, unique = set(), []
    for s in out:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique
