"""The run report: every tidy table and result JSON of a results directory, as HTML and Markdown.

    esparse report RESULTS_DIR [--out-dir RESULTS_DIR/report] [--gpu-dir reports/gpu]

The HTML report is self-contained (figures embedded as base64 PNG, inline CSS, no scripts, no
external resources); the Markdown report has the same text and tables (pipe tables) and links
the same figures as PNG files in `figures/` next to it. Tables come from pandas (`to_html`,
`to_markdown`), figures from pandas/matplotlib plotting on the Agg backend.

What is rendered, each only where its input exists (an absent input is named as "not run in
this configuration", never filled in):
- WikiText-2 perplexity (`tables/wikitext_ppl.csv`) by method x pattern with seqlen and windows,
  the ratio to dense, the best method per pattern, and the published reference points of
  DESIGN.md beside ours with their seqlen;
- zero-shot accuracy (`tables/zeroshot.csv`) by task, the average over tasks recomputed here;
- the ablation (`tables/ablation.csv`);
- per-GEMM kernel speedups by shape and token count (the committed H200 table
  `reports/gpu/kernels_h200.csv`) with the physical limit, and the run's kernel build plans;
- end-to-end latency and memory (`tables/latency.csv`, `tables/memory.csv`, and the committed
  `reports/gpu/latency_h200.csv`, `memory_h200.csv`);
- pruning summaries and the channel-shuffle efficacy per layer (from every `prune.json`);
- provenance: code versions, configuration hashes, software, hardware, seeds, data sources and
  every input checksum, each listed once.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from .errors import DataError, EsparseError
from .io import atomic_path, read_json, sha256_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO_ROOT / "reports" / "templates"
DEFAULT_GPU_DIR = REPO_ROOT / "reports" / "gpu"

# Tables a run may produce (relative to the results directory) and committed GPU tables
# (relative to the GPU directory, reports/gpu/ by default).
RUN_TABLES = {
    "wikitext_ppl": "tables/wikitext_ppl.csv",
    "zeroshot": "tables/zeroshot.csv",
    "ablation": "tables/ablation.csv",
    "latency": "tables/latency.csv",
    "memory": "tables/memory.csv",
}
GPU_TABLES = {
    "kernels_h200": "kernels_h200.csv",
    "latency_h200": "latency_h200.csv",
    "memory_h200": "memory_h200.csv",
}
ABSENT = "not run in this configuration"

METHOD_ORDER = ("dense", "magnitude", "wanda", "sparsegpt", "esparse")

# Published WikiText-2 perplexities quoted in DESIGN.md (reference points, not results of this
# suite). LLaMA-2 numbers: the Wanda README, seqlen 4096; E-Sparse: the paper, LLaMA-13B 2:4
# (published LLaMA-1 numbers use seqlen 2048).
PUBLISHED_PPL = (
    [
        {"source": "Wanda README", "model": model, "seqlen": 4096, "method": method, "pattern": pattern, "ppl": ppl}
        for model, dense, table in (
            ("LLaMA-2-7B", 5.12, {"unstructured-50%": (6.51, 6.42), "4:8": (8.12, 7.97), "2:4": (10.17, 11.02)}),
            ("LLaMA-2-13B", 4.57, {"unstructured-50%": (5.63, 5.56), "4:8": (6.60, 6.55), "2:4": (8.32, 8.27)}),
            ("LLaMA-2-70B", 3.12, {"unstructured-50%": (3.98, 3.98), "4:8": (4.59, 4.47), "2:4": (5.40, 5.16)}),
        )
        for method, pattern, ppl in (
            [("dense", "dense", dense)]
            + [("sparsegpt", p, v[0]) for p, v in table.items()]
            + [("wanda", p, v[1]) for p, v in table.items()]
        )
    ]
    + [{"source": "E-Sparse paper", "model": "LLaMA-13B", "seqlen": 2048, "method": "esparse", "pattern": "2:4",
        "ppl": 8.26}]
)
PUBLISHED_NOTES = (
    "E-Sparse reports better average zero-shot accuracy than SparseGPT and Wanda at 2:4 (no per-task "
    "numbers are quoted in DESIGN.md, so none are shown here).",
    "E-Sparse reports 1.24-1.53x per-GEMM speedups and up to 43.52% memory saved, measured on Ampere (A100) "
    "inside FasterTransformer.",
)
# Physical limits of a 2:4 GEMM against dense (DESIGN.md), used where a kernel table has no
# per-row `ratio_limit` column.
LIMIT_MEMORY_BOUND = 1.78  # 1 token: 0.5625 of the dense bytes (values + 2-bit indices)
LIMIT_COMPUTE_BOUND = 2.0  # many tokens: sparse tensor cores


# ------------------------------------------------------------------------------ building blocks


@dataclass
class Table:
    """A table as shown: every cell already formatted as text (same text in HTML and Markdown)."""

    caption: str
    frame: pd.DataFrame
    note: str = ""

    def html(self) -> str:
        return self.frame.to_html(index=False, escape=True, border=0, classes="data", na_rep="")

    def markdown(self) -> str:
        return self.frame.to_markdown(index=False, disable_numparse=True)


@dataclass
class Figure:
    name: str  # file stem in figures/
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def filename(self) -> str:
        return f"{self.name}.png"


@dataclass
class Source:
    """One input table: where it was looked for and whether it was there."""

    name: str
    path: Path
    label: str  # as shown: path relative to the results dir or the repository
    frame: pd.DataFrame | None = None
    sha256: str | None = None

    @property
    def found(self) -> bool:
        return self.frame is not None


@dataclass
class Section:
    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    absent: str | None = None  # set when nothing of this section exists in the run


@dataclass
class RunData:
    results_dir: Path
    sources: dict[str, Source]
    records: dict[str, dict]  # results-relative path -> JSON of every record with a provenance block
    config: dict | None = None

    def records_of(self, prefix: str, name: str | None = None) -> list[tuple[str, dict]]:
        return [(path, rec) for path, rec in sorted(self.records.items())
                if path.startswith(prefix) and (name is None or Path(path).name == name)]


# ------------------------------------------------------------------------------ collecting the run


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"table {path} cannot be read as CSV: {error}") from error


def _repo_label(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _wanted_json(rel: str) -> bool:
    parts = rel.split("/")
    if parts[0] in ("report", "audit", "logs", "benchmarks"):
        return False
    if parts[0] == "pruned":  # model directories: only the pruning record carries provenance
        return parts[-1] == "prune.json"
    return not any(part.endswith(".tasks") for part in parts)  # generated lm-eval task configs


def collect_run(results_dir: str | os.PathLike, gpu_dir: str | os.PathLike | None = DEFAULT_GPU_DIR,
                config: dict | None = None) -> RunData:
    """Load every known table (absent ones stay absent) and every JSON record with provenance."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"results directory {root} does not exist")
    sources: dict[str, Source] = {}
    for name, rel in RUN_TABLES.items():
        sources[name] = Source(name, root / rel, rel)
    if gpu_dir is not None:
        for name, rel in GPU_TABLES.items():
            path = Path(gpu_dir) / rel
            sources[name] = Source(name, path, _repo_label(path))
    for source in sources.values():
        if source.path.is_file():
            source.frame = _read_table(source.path)
            source.sha256 = sha256_file(source.path)
    records = {}
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        if not _wanted_json(rel):
            continue
        try:
            payload = read_json(path)
        except ValueError as error:
            raise DataError(f"result {path} is not valid JSON: {error}") from error
        record = as_record(payload)
        if record is not None:
            records[rel] = record
    return RunData(root, sources, records, config)


def as_record(payload: Any) -> dict | None:
    """A result record: a JSON with a provenance block, at the top or (lm-eval results) under "esparse"."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("provenance"), dict):
        return payload
    nested = payload.get("esparse")
    if isinstance(nested, dict) and isinstance(nested.get("provenance"), dict):
        return {"provenance": nested["provenance"]}
    return None


# ------------------------------------------------------------------------------ formatting helpers


def pattern_label(slug: str) -> str:
    """'2of4' -> '2:4', 'unstructured50' -> 'unstructured-50%', 'dense' stays."""
    from .pruning.pattern import SparsityPattern

    if slug == "dense" or not isinstance(slug, str):
        return str(slug)
    try:
        return SparsityPattern.parse(slug).label
    except EsparseError:  # an unknown spelling is shown as written
        return slug


def _pattern_sort_key(label: str) -> tuple:
    """dense, unstructured by sparsity, then N:M with the larger M first (4:8 before 2:4)."""
    from .pruning.pattern import SparsityPattern

    if label == "dense":
        return (0, 0.0, 0)
    try:
        pattern = SparsityPattern.parse(label.replace("unstructured-", "unstructured").rstrip("%"))
    except EsparseError:
        return (3, 0.0, label)
    if pattern.is_nm:
        return (2, -pattern.m, -pattern.n)
    return (1, pattern.sparsity, 0)


def _method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), str(method))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_ppl(value: Any) -> str:
    if _is_missing(value):
        return ""
    value = float(value)
    return f"{value:.3f}" if value < 100 else f"{value:,.1f}"


def fmt_ratio(value: Any) -> str:
    return "" if _is_missing(value) else f"{float(value):.2f}x"


def fmt_ratio3(value: Any) -> str:
    return "" if _is_missing(value) else f"{float(value):.3f}x"


def fmt_pct(value: Any, digits: int = 2) -> str:
    return "" if _is_missing(value) else f"{float(value) * 100:.{digits}f}"


def fmt_general(value: Any) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:,.0f}"  # byte counts and the like
        return f"{value:.6g}"
    return str(value)


def fmt_mib(value: Any) -> str:
    return "" if _is_missing(value) else f"{float(value) / 2**20:,.1f}"


def format_frame(frame: pd.DataFrame, formats: dict[str, Callable[[Any], str]] | None = None,
                 default: Callable[[Any], str] = fmt_general) -> pd.DataFrame:
    """Every cell as text: `formats` per column, `default` elsewhere; column names as text."""
    formats = formats or {}
    out = pd.DataFrame(index=range(len(frame)))
    for column in frame.columns:
        fn = formats.get(column, default)
        out[str(column)] = [fn(v) for v in frame[column].tolist()]
    return out


def _flatten_columns(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.columns = [" ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    return frame


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int, columns: int, width: float = 4.2, height: float = 3.2):
    plt = _pyplot()
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _lacks(section: "Section", source: "Source", required: Iterable[str]) -> bool:
    """When a table lacks columns a section needs, show it as written and say so (True: it lacks some)."""
    missing = [c for c in required if c not in source.frame.columns]
    if missing:
        section.paragraphs.append(f"{source.label} lacks the column(s) {', '.join(missing)} this section "
                                  "needs; shown as written.")
        section.tables.append(Table(source.label, format_frame(source.frame)))
    return bool(missing)


def _ordered(values: Iterable, key: Callable) -> list:
    return sorted(dict.fromkeys(values), key=key)


# ------------------------------------------------------------------------------ WikiText-2 perplexity


def _ppl_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["pattern_label"] = [pattern_label(p) for p in frame["pattern"]]
    return frame


def ppl_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows (model, seqlen, windows, method), columns pattern labels, values ppl (numbers)."""
    frame = _ppl_frame(frame)
    pivot = frame.pivot_table(index=["model", "seqlen", "windows", "method"], columns="pattern_label",
                              values="ppl", aggfunc="first")
    pivot = pivot[_ordered(pivot.columns, _pattern_sort_key)]
    order = sorted(pivot.index, key=lambda ix: (ix[0], ix[1], ix[2], _method_sort_key(ix[3])))
    return pivot.loc[order]


def ppl_winners(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and pruned pattern: the best method, its ppl, the runner-up and the margin."""
    frame = _ppl_frame(frame)
    rows = []
    dense = {(r.model, r.seqlen, r.windows): r.ppl for r in frame[frame["method"] == "dense"].itertuples()}
    pruned = frame[frame["method"] != "dense"]
    for (model, seqlen, windows, label), group in pruned.groupby(["model", "seqlen", "windows", "pattern_label"]):
        ranked = group.sort_values("ppl")
        best = ranked.iloc[0]
        row = {"model": model, "seqlen": seqlen, "windows": windows, "pattern": label, "best": best["method"],
               "ppl": best["ppl"], "dense ppl": dense.get((model, seqlen, windows)), "runner-up": "",
               "runner-up ppl": None, "margin": None}
        if len(ranked) > 1:
            second = ranked.iloc[1]
            row.update({"runner-up": second["method"], "runner-up ppl": second["ppl"],
                        "margin": (second["ppl"] - best["ppl"]) / second["ppl"]})
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["seqlen"], r["windows"], _pattern_sort_key(r["pattern"])))
    return pd.DataFrame(rows, columns=["model", "seqlen", "windows", "pattern", "best", "ppl", "dense ppl",
                                       "runner-up", "runner-up ppl", "margin"])


def published_reference() -> pd.DataFrame:
    return pd.DataFrame(PUBLISHED_PPL)


def ppl_beside_published(frame: pd.DataFrame) -> pd.DataFrame:
    """Our perplexities and the published ones in one pivot, each row with its seqlen."""
    ours = _ppl_frame(frame)
    ours = ours.assign(source=[f"this run ({w} of {a} windows)" if w < a else f"this run (all {a} windows)"
                               for w, a in zip(ours["windows"], ours["windows_available"])])
    ours = ours[["source", "model", "seqlen", "method", "pattern_label", "ppl"]]
    theirs = published_reference().rename(columns={"pattern": "pattern_label"})
    both = pd.concat([ours, theirs], ignore_index=True)
    pivot = both.pivot_table(index=["source", "model", "seqlen", "method"], columns="pattern_label",
                             values="ppl", aggfunc="first")
    pivot = pivot[_ordered(pivot.columns, _pattern_sort_key)]
    order = sorted(pivot.index, key=lambda ix: (not ix[0].startswith("this run"), ix[1], ix[2], _method_sort_key(ix[3])))
    return pivot.loc[order]


def ppl_figure(frame: pd.DataFrame) -> Figure:
    frame = _ppl_frame(frame)
    groups = list(frame.groupby(["model", "seqlen", "windows"]))
    fig, axes = _grid(len(groups), 2, width=6.0, height=3.8)
    for ax, ((model, seqlen, windows), group) in zip(axes, groups):
        pruned = group[group["method"] != "dense"]
        if len(pruned):
            pivot = pruned.pivot_table(index="pattern_label", columns="method", values="ppl", aggfunc="first")
            pivot = pivot.loc[_ordered(pivot.index, _pattern_sort_key), _ordered(pivot.columns, _method_sort_key)]
            values = group["ppl"].astype(float)
            wide = bool(values.max() / max(values.min(), 1e-12) > 10)  # log scale only where the range needs it
            pivot.plot.bar(ax=ax, logy=wide, rot=0)
            if not wide:
                ax.set_ylim(values.min() * 0.98, values.max() * 1.02)
        dense = group.loc[group["method"] == "dense", "ppl"]
        if len(dense):
            ax.axhline(float(dense.iloc[0]), color="black", linestyle="--", linewidth=1,
                       label=f"dense {fmt_ppl(dense.iloc[0])}")
        ax.set_title(f"{model} (seqlen {seqlen}, {windows} windows)")
        ax.set_xlabel("pattern")
        ax.set_ylabel("WikiText-2 perplexity" + (" (log)" if ax.get_yscale() == "log" else ""))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return Figure("wikitext_ppl", "WikiText-2 perplexity by method and pattern (log scale where the values span "
                                  "more than 10x); dashed: dense.", _png(fig))


def wikitext_section(run: RunData) -> Section:
    source = run.sources["wikitext_ppl"]
    section = Section("wikitext", "WikiText-2 perplexity", sources=[source])
    section.paragraphs.append(
        "Protocol (Wanda/SparseGPT): wikitext-2-raw-v1 test rows joined with \"\\n\\n\", tokenized once, cut into "
        "non-overlapping windows of seqlen tokens; ppl = exp(total NLL / (windows x seqlen)). Not lm-eval's "
        "document-level word perplexity. Every number carries its seqlen and window count; a subset of the "
        "windows is named as such.")
    reference = published_reference()
    if not source.found:
        section.absent = f"{source.label}: {ABSENT}"
        section.tables.append(Table("Published reference points (DESIGN.md)", format_frame(
            reference, {"ppl": fmt_ppl})))
        return section
    if _lacks(section, source, ("model", "method", "pattern", "seqlen", "windows", "windows_available", "ppl")):
        return section
    frame = source.frame
    for (model, seqlen), group in frame.groupby(["model", "seqlen"]):
        windows = sorted(set(zip(group["windows"], group["windows_available"])))
        text = ", ".join(f"{w} of {a} windows" + (" (subset)" if w < a else "") for w, a in windows)
        section.paragraphs.append(f"{model}: seqlen {seqlen}, {text}.")
    pivot = ppl_pivot(frame)
    section.tables.append(Table(
        "Perplexity by method (rows) and pattern (columns)",
        format_frame(_flatten_columns(pivot.reset_index()), {c: fmt_ppl for c in pivot.columns})))
    dense = frame[frame["method"] == "dense"].set_index(["model", "seqlen", "windows"])["ppl"]
    if len(dense):
        ratio = pivot.copy()
        for index in ratio.index:
            base = dense.get(index[:3])
            ratio.loc[index] = ratio.loc[index] / base if base is not None else float("nan")
        ratio = ratio.drop(index=[ix for ix in ratio.index if ix[3] == "dense"], errors="ignore")
        ratio = ratio.drop(columns=["dense"], errors="ignore")
        if len(ratio):
            section.tables.append(Table("Perplexity relative to dense (x dense ppl; lower is better)",
                                        format_frame(_flatten_columns(ratio.reset_index()),
                                                     {c: fmt_ratio3 for c in ratio.columns})))
    winners = ppl_winners(frame)
    if len(winners):
        section.tables.append(Table(
            "Best method per pattern (margin: how much lower its ppl is than the runner-up's)",
            format_frame(winners, {"ppl": fmt_ppl, "dense ppl": fmt_ppl, "runner-up ppl": fmt_ppl,
                                   "margin": lambda v: "" if _is_missing(v) else f"{float(v) * 100:.2f}%"})))
    both = ppl_beside_published(frame)
    section.tables.append(Table(
        "This run beside the published reference points of DESIGN.md (each with its seqlen; different models, "
        "so compare the ordering of methods and the gap to dense, not the values)",
        format_frame(_flatten_columns(both.reset_index()), {c: fmt_ppl for c in both.columns})))
    section.figures.append(ppl_figure(frame))
    return section


# ------------------------------------------------------------------------------ zero-shot


def zeroshot_pivot(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows (model, method, pattern), columns tasks, values accuracy in %, plus the recomputed mean."""
    chosen = frame[frame["metric"] == metric].copy()
    chosen["pattern"] = [pattern_label(p) for p in chosen["pattern"]]
    pivot = chosen.pivot_table(index=["model", "method", "pattern"], columns="task", values="value", aggfunc="first")
    pivot = pivot[sorted(pivot.columns)] * 100.0
    order = sorted(pivot.index, key=lambda ix: (ix[0], _method_sort_key(ix[1]), _pattern_sort_key(ix[2])))
    pivot = pivot.loc[order]
    pivot["average"] = pivot.mean(axis=1, skipna=True)
    pivot["tasks"] = pivot.drop(columns="average").notna().sum(axis=1)
    return pivot


def zeroshot_section(run: RunData) -> Section:
    source = run.sources["zeroshot"]
    section = Section("zeroshot", "Zero-shot accuracy (lm-evaluation-harness)", sources=[source])
    section.paragraphs.append(PUBLISHED_NOTES[0])
    if not source.found:
        section.absent = f"{source.label}: {ABSENT}"
        return section
    if _lacks(section, source, ("model", "method", "pattern", "task", "metric", "value")):
        return section
    frame = source.frame
    section.paragraphs.append(
        "Accuracy in % per task; 'average' is recomputed here as the unweighted mean over the tasks of each row "
        "('tasks' counts them: averages are comparable only between rows with the same count).")
    averages = {}
    for metric in [m for m in ("acc", "acc_norm") if m in set(frame["metric"])] + sorted(
            set(frame["metric"]) - {"acc", "acc_norm"}):
        pivot = zeroshot_pivot(frame, metric)
        averages[metric] = pivot["average"]
        formats = {c: (lambda v: "" if _is_missing(v) else f"{float(v):.2f}") for c in pivot.columns}
        formats["tasks"] = fmt_general
        section.tables.append(Table(f"{metric} (%) by task", format_frame(pivot.reset_index(), formats)))
    samples = frame.drop_duplicates(["task"])[[c for c in ("task", "n", "source") if c in frame.columns]].sort_values("task")
    section.tables.append(Table("Evaluated samples per task and their data source", format_frame(samples)))
    if averages:
        metric = "acc" if "acc" in averages else next(iter(averages))
        avg = averages[metric].reset_index()
        fig, axes = _grid(avg["model"].nunique(), 2, width=6.0, height=3.6)
        for ax, (model, group) in zip(axes, avg.groupby("model")):
            pivot = group.pivot_table(index="pattern", columns="method", values="average", aggfunc="first")
            pivot = pivot.loc[_ordered(pivot.index, _pattern_sort_key), _ordered(pivot.columns, _method_sort_key)]
            pivot.plot.bar(ax=ax, rot=0)
            ax.set_title(f"{model}: average {metric} over tasks")
            ax.set_ylabel(f"{metric} (%)")
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        section.figures.append(Figure("zeroshot_average", f"Average zero-shot {metric} by method and pattern "
                                                          "(recomputed over the tasks of each row).", _png(fig)))
    return section


# ------------------------------------------------------------------------------ ablation


def ablation_pivots(frame: pd.DataFrame, choice: dict) -> list[tuple[str, pd.DataFrame]]:
    """metric x shuffle at the configured alpha/bins, then the alpha and bins sweeps (held-apart ppl)."""
    configured = choice.get("configured") or {}
    alpha, bins = configured.get("alpha"), configured.get("bins")
    if alpha is None or bins is None:
        return []
    out = []
    base = frame[(frame["alpha"] == float(alpha)) & (frame["bins"] == int(bins))]
    if len(base):
        grid = base.pivot_table(index="metric", columns="shuffle", values="heldout_ppl", aggfunc="first")
        out.append((f"Held-apart perplexity by metric (rows) and shuffle (columns) at alpha {alpha:g}, {bins} bins",
                    grid.reset_index()))
    fixed = frame[(frame["metric"] == choice.get("metric")) & (frame["shuffle"] == choice.get("shuffle"))]
    for swept, other, value in (("alpha", "bins", int(bins)), ("bins", "alpha", float(alpha))):
        sweep = fixed[fixed[other] == value].sort_values(swept)[[swept, "heldout_ppl"]].drop_duplicates(swept)
        if len(sweep) > 1:
            out.append((f"Held-apart perplexity against {swept} ({choice.get('metric')}, {choice.get('shuffle')}, "
                        f"{other} {value:g})", sweep))
    return out


def ablation_section(run: RunData) -> Section:
    source = run.sources["ablation"]
    section = Section("ablation", "Ablation of E-Sparse's settings", sources=[source])
    if not source.found:
        section.absent = f"{source.label}: {ABSENT}"
        return section
    frame = source.frame
    choice_path = run.results_dir / "tables" / "ablation_choice.json"
    choice = read_json(choice_path) if choice_path.is_file() else {}
    if {"seqlen", "windows"} <= set(frame.columns):
        protocol = ", ".join(f"seqlen {s}, {w} windows" for s, w in
                             sorted(set(zip(frame["seqlen"], frame["windows"]))))
        section.paragraphs.append(f"Perplexity on held-apart C4 documents, never on WikiText-2 test ({protocol}).")
    if choice:
        chosen = choice.get("chosen") or {}
        section.paragraphs.append(
            f"Choice ({choice.get('criterion', 'lowest held-apart perplexity')}): alpha {chosen.get('alpha')}, "
            f"{chosen.get('bins')} bins, held-apart ppl {fmt_ppl(choice.get('chosen_heldout_ppl'))}; the configured "
            f"method settings (alpha {(choice.get('configured') or {}).get('alpha')}, "
            f"{(choice.get('configured') or {}).get('bins')} bins) "
            + ("are this choice." if choice.get("configured_is_chosen") else "differ from it."))
        if {"metric", "shuffle", "alpha", "bins", "heldout_ppl"} <= set(frame.columns):
            for caption, table in ablation_pivots(frame, choice):
                section.tables.append(Table(caption, format_frame(
                    table, {c: fmt_ppl for c in table.columns if c not in ("metric", "alpha", "bins")})))
    formats = {c: fmt_ppl for c in frame.columns if "ppl" in str(c)}
    formats.update({c: (lambda v: "" if _is_missing(v) else f"{float(v):.4f}") for c in frame.columns
                    if "efficacy" in str(c)})
    formats.update({c: (lambda v: "" if _is_missing(v) else f"{str(v)[:12]}...") for c in frame.columns
                    if str(c).endswith("sha256")})
    section.tables.append(Table("Every ablation run (digests shortened; in full under Provenance)",
                                format_frame(frame, formats)))
    return section


# ------------------------------------------------------------------------------ kernels


def _shape_label(frame: pd.DataFrame) -> pd.Series:
    if {"out_features", "in_features"} <= set(frame.columns):
        dims = frame["out_features"].astype(str) + "x" + frame["in_features"].astype(str)
        if "shape" in frame.columns:
            return frame["shape"].astype(str) + " (" + dims + ")"
        return dims
    return frame["shape"].astype(str)


def kernel_backends(frame: pd.DataFrame) -> list[str]:
    """Every non-dense backend: what dispatch runs first, then the kernels, variants without the permutation last."""
    present = [b for b in dict.fromkeys(frame["backend"].astype(str)) if b != "dense"]
    return sorted(present, key=lambda b: (not b.startswith("dispatch"), b.endswith("_noperm"), b))


def plotted_backends(frame: pd.DataFrame) -> list[str]:
    return [b for b in kernel_backends(frame) if b == "dispatch" or
            (not b.startswith("dispatch") and not b.endswith("_noperm") and b != "decompress_dense")]


def kernel_limit(frame: pd.DataFrame) -> pd.Series:
    """Physical 2:4 limit per (shape, tokens): the table's `ratio_limit` column when present."""
    sparse = frame[frame["backend"] != "dense"]
    if "ratio_limit" in sparse.columns and sparse["ratio_limit"].notna().any():
        return sparse.groupby(["shape_label", "tokens"])["ratio_limit"].max()
    keys = sparse.drop_duplicates(["shape_label", "tokens"])[["shape_label", "tokens"]]
    # Without the table's own ceilings: memory-bound at one token, compute-bound from 2048 tokens,
    # unknown in between (not interpolated).
    values = [LIMIT_MEMORY_BOUND if t == 1 else (LIMIT_COMPUTE_BOUND if t >= 2048 else float("nan"))
              for t in keys["tokens"]]
    return pd.Series(values, index=pd.MultiIndex.from_frame(keys))


def kernel_pivot(frame: pd.DataFrame, backend: str) -> pd.DataFrame:
    chosen = frame[frame["backend"] == backend]
    pivot = chosen.pivot_table(index="shape_label", columns="tokens", values="ratio_vs_dense", aggfunc="first")
    order = chosen.drop_duplicates("shape_label")["shape_label"].tolist()
    pivot = pivot.loc[[s for s in order if s in pivot.index]]
    pivot.loc["median over shapes"] = pivot.median(axis=0)
    return pivot


def kernels_figure(frame: pd.DataFrame, name: str, title: str) -> Figure:
    limit = kernel_limit(frame)
    backends = plotted_backends(frame)
    shapes = frame.drop_duplicates("shape_label")["shape_label"].tolist()
    fig, axes = _grid(len(shapes), 4, width=3.9, height=3.0)
    for ax, shape in zip(axes, shapes):
        rows = frame[(frame["shape_label"] == shape) & frame["backend"].isin(backends)]
        pivot = rows.pivot_table(index="tokens", columns="backend", values="ratio_vs_dense", aggfunc="first")
        pivot = pivot[[b for b in backends if b in pivot.columns]]
        pivot.plot(ax=ax, logx=True, marker="o", markersize=3)
        if shape in limit.index.get_level_values(0):
            limit.loc[shape].sort_index().plot(ax=ax, style="k--", linewidth=1, label="physical limit")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup vs dense")
        ax.legend(fontsize=7)
    return Figure(name, title, _png(fig))


def _bucket_choices(chosen: dict[str, dict[str, int]]) -> str:
    """'1, 2, 4: ours x3, dense; 2048: cusparselt x4': token buckets with the same choices share one entry."""
    groups: dict[str, list[str]] = {}
    for bucket, counts in sorted(chosen.items(), key=lambda kv: int(kv[0])):
        text = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(counts.items()))
        groups.setdefault(text, []).append(bucket)
    return "; ".join(f"{', '.join(buckets)} tokens: {text}" for text, buckets in groups.items())


def kernel_plans(results_dir: Path) -> pd.DataFrame:
    """One row per kernel build plan: where it was built, whether it was measured, what it chose."""
    rows = []
    for path in sorted(results_dir.glob("kernels/*/*/*/plan.json")):
        plan = read_json(path)
        chosen: dict[str, dict[str, int]] = {}
        for entry in (plan.get("shapes") or {}).values():
            for bucket, choice in (entry.get("buckets") or {}).items():
                chosen.setdefault(str(bucket), {}).setdefault(str(choice.get("backend")), 0)
                chosen[str(bucket)][str(choice.get("backend"))] += 1
        model, method, pattern = path.parent.relative_to(results_dir / "kernels").parts
        device = plan.get("device_info") or {}
        rows.append({
            "model": model, "method": method, "pattern": pattern_label(pattern),
            "device": device.get("name", plan.get("device")) if isinstance(device, dict) else plan.get("device"),
            "measured": "yes" if plan.get("measured") else f"no: {plan.get('reason', 'not measured')}",
            "packed layers": len(plan.get("layers") or {}), "skipped": len(plan.get("skipped") or []),
            "shapes": len(plan.get("shapes") or {}),
            "backend per tokens": _bucket_choices(chosen),
        })
    return pd.DataFrame(rows)


def kernels_section(run: RunData) -> Section:
    sources = [run.sources["kernels_h200"]] if "kernels_h200" in run.sources else []
    section = Section("kernels", "Per-GEMM 2:4 kernel speedups", sources=sources)
    section.paragraphs.append(
        f"Physical limit of a 2:4 GEMM against dense: {LIMIT_MEMORY_BOUND}x at one token (memory-bound: values plus "
        f"2-bit indices are 0.5625 of the dense bytes), {LIMIT_COMPUTE_BOUND:g}x at many tokens (compute-bound, "
        "sparse tensor cores); where a table has the measured ceilings per row (`ratio_limit`) those are shown. "
        + PUBLISHED_NOTES[1])
    plans = kernel_plans(run.results_dir)
    if len(plans):
        section.tables.append(Table(
            "Sparse-kernel build plans of this run (kernels/*/*/*/plan.json): packed 2:4 layers and the backend "
            "chosen per token bucket", format_frame(plans)))
    found = [s for s in sources if s.found]
    if not found:
        if plans.empty:
            section.absent = "; ".join(f"{s.label}: {ABSENT}" for s in sources) + f"; kernel plans: {ABSENT}"
        else:
            section.paragraphs.append("; ".join(f"{s.label}: {ABSENT}" for s in sources) + ".")
        return section
    for source in found:
        if _lacks(section, source, ("shape", "tokens", "backend", "ratio_vs_dense")):
            continue
        frame = source.frame.copy()
        frame["shape_label"] = _shape_label(frame)
        device = ", ".join(sorted(set(frame["device"].astype(str)))) if "device" in frame.columns else "unknown device"
        section.paragraphs.append(
            f"{source.label}: {len(frame)} rows, device {device}. Backends: 'dispatch' is what the sparse linear "
            "layer runs after choosing per token count (dense allowed), 'dispatch_sparse' the best sparse kernel "
            "only; '_noperm' rows time the same kernel without the channel-shuffle gather.")
        limit = kernel_limit(frame).unstack("tokens")
        shape_order = [s for s in frame.drop_duplicates("shape_label")["shape_label"] if s in limit.index]
        limit = limit.loc[shape_order]
        for backend in kernel_backends(frame):
            pivot = kernel_pivot(frame, backend)
            shown = pivot.map(fmt_ratio).astype(object)
            for shape in pivot.index.intersection(limit.index):
                for tokens in pivot.columns.intersection(limit.columns):
                    value, bound = pivot.loc[shape, tokens], limit.loc[shape, tokens]
                    if not _is_missing(value) and not _is_missing(bound) and value > bound:
                        shown.loc[shape, tokens] += " (above limit!)"
            shown.columns = [str(c) for c in shown.columns]
            section.tables.append(Table(
                f"{source.label}: speedup vs dense cuBLAS, backend {backend}, by shape (rows) and tokens (columns); "
                "a value above the physical limit is marked",
                shown.reset_index().rename(columns={"shape_label": "shape"})))
        section.tables.append(Table(
            f"{source.label}: physical limit of the speedup (dense bound / 2:4 bound)",
            format_frame(_flatten_columns(limit.reset_index().rename(columns={"shape_label": "shape"})),
                         {str(c): fmt_ratio for c in limit.columns})))
        stem = Path(source.label).stem
        section.figures.append(kernels_figure(frame, f"speedup_{stem}",
                                              f"{source.label}: speedup vs dense against tokens per shape; "
                                              "dashed: physical limit, grey: dense."))
    return section


# ------------------------------------------------------------------------------ latency and memory


def _numeric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


def _label_columns(frame: pd.DataFrame) -> list[str]:
    numeric = set(_numeric_columns(frame))
    wanted = ("model", "method", "shuffle", "pattern", "batch", "context", "prompt", "phase", "tokens")
    chosen = [c for c in frame.columns if any(w in str(c).lower() for w in wanted)]
    return chosen or [c for c in frame.columns if c not in numeric][:4]


def memory_figure(frame: pd.DataFrame, name: str, title: str) -> Figure | None:
    value_columns = [c for c in _numeric_columns(frame) if "bytes" in str(c).lower()]
    measured = frame.dropna(subset=value_columns, how="all") if value_columns else frame.iloc[0:0]
    if measured.empty:
        return None
    labels = measured[_label_columns(measured)].astype(str).agg(" | ".join, axis=1)
    plot = (measured[value_columns] / 2**20).set_axis(labels.tolist())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(plot) + 1.6))
    plot.plot.barh(ax=ax)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(value_columns)))
    return Figure(name, title, _png(fig))


def latency_memory_section(run: RunData) -> Section:
    names = ["latency", "memory", "latency_h200", "memory_h200"]
    sources = [run.sources[n] for n in names if n in run.sources]
    section = Section("latency", "End-to-end latency and memory", sources=sources)
    if not any(s.found for s in sources):
        section.absent = "; ".join(f"{s.label}: {ABSENT}" for s in sources)
        return section
    for source in sources:
        if not source.found:
            section.paragraphs.append(f"{source.label}: {ABSENT}.")
            continue
        frame = source.frame
        if "status" in frame.columns and not (frame["status"] == "measured").any():
            reasons = "; ".join(sorted(set(frame["status"].astype(str))))
            section.paragraphs.append(f"{source.label}: {len(frame)} configurations, none measured ({reasons}).")
            continue
        section.tables.append(Table(source.label, format_frame(frame)))
        if source.name.startswith("memory"):
            figure = memory_figure(frame, f"memory_{Path(source.label).stem}", f"{source.label}: memory in MiB.")
            if figure is not None:
                section.figures.append(figure)
            else:
                section.paragraphs.append(f"{source.label}: no measured byte counts to plot.")
    return section


# ------------------------------------------------------------------------------ pruning and shuffle


def pruning_rows(run: RunData) -> pd.DataFrame:
    rows = []
    for path, record in run.records_of("pruned/", "prune.json"):
        summary = record.get("summary", {})
        parts = path.split("/")
        layers = record.get("layers", [])
        rows.append({
            "model": parts[1] if len(parts) > 4 else "", "method": record.get("method"),
            "pattern": record.get("pattern"), "achieved sparsity": summary.get("achieved_sparsity"),
            "layers": len(layers), "masks checked": sum(1 for layer in layers if layer.get("mask_check")),
            "seconds": summary.get("seconds"), "peak memory MiB": summary.get("peak_memory_bytes"),
            "memory kind": summary.get("peak_memory_kind"), "device": summary.get("device"),
        })
    rows.sort(key=lambda r: (r["model"], _method_sort_key(r["method"]), _pattern_sort_key(str(r["pattern"]))))
    frame = pd.DataFrame(rows)
    if not frame.empty:
        # Cost relative to Wanda on the same model and pattern, from the same run (E-Sparse's budget: 1.5x).
        wanda = frame[frame["method"] == "wanda"].set_index(["model", "pattern"])["seconds"]
        frame.insert(frame.columns.get_loc("seconds") + 1, "x wanda seconds", [
            (float(r.seconds) / float(wanda[(r.model, r.pattern)])
             if (r.model, r.pattern) in wanda.index and not _is_missing(r.seconds) else float("nan"))
            for r in frame.itertuples()])
    return frame


def shuffle_rows(run: RunData) -> pd.DataFrame:
    rows = []
    for path, record in run.records_of("pruned/", "prune.json"):
        parts = path.split("/")
        for index, layer in enumerate(record.get("layers", [])):
            efficacy = layer.get("shuffle_efficacy")
            if efficacy is None:
                continue
            rows.append({"model": parts[1] if len(parts) > 4 else "", "method": record.get("method"),
                         "pattern": record.get("pattern"), "index": index, "layer": layer.get("name"),
                         "efficacy": float(efficacy)})
    return pd.DataFrame(rows, columns=["model", "method", "pattern", "index", "layer", "efficacy"])


def shuffle_figure(rows: pd.DataFrame) -> Figure:
    groups = list(rows.groupby("model"))
    fig, axes = _grid(len(groups), 1, width=10.0, height=3.6)
    for ax, (model, group) in zip(axes, groups):
        pivot = group.assign(run=group["method"] + " " + group["pattern"]).pivot_table(
            index="index", columns="run", values="efficacy", aggfunc="first")
        pivot.plot(ax=ax, marker=".", markersize=3, linewidth=0.8)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{model}: channel-shuffle efficacy per layer (kept score with shuffle / without)")
        ax.set_xlabel("layer (pruning order)")
        ax.set_ylabel("efficacy")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return Figure("shuffle_efficacy", "Channel-shuffle efficacy per layer: kept N:M score with the permutation "
                                      "divided by the kept score without (1 = no gain).", _png(fig))


def pruning_section(run: RunData) -> Section:
    section = Section("pruning", "Pruning: achieved sparsity and channel-shuffle efficacy")
    summary = pruning_rows(run)
    if summary.empty:
        section.absent = f"pruned/*/*/*/prune.json: {ABSENT}"
        return section
    section.tables.append(Table("Pruning runs (every layer's mask is checked against its pattern)", format_frame(
        summary, {"achieved sparsity": lambda v: "" if _is_missing(v) else f"{float(v):.6f}",
                  "seconds": lambda v: "" if _is_missing(v) else f"{float(v):.1f}",
                  "x wanda seconds": lambda v: "" if _is_missing(v) else f"{float(v):.2f}",
                  "peak memory MiB": fmt_mib})))
    rows = shuffle_rows(run)
    if rows.empty:
        section.paragraphs.append("Channel shuffle: no pruning run in this configuration used it.")
        return section
    stats = rows.groupby(["model", "method", "pattern"])["efficacy"].agg(
        layers="count", mean="mean", min="min", max="max",
        improved=lambda s: float((s > 1.0).mean())).reset_index()
    section.tables.append(Table("Channel-shuffle efficacy over layers ('improved': share of layers above 1)",
                                format_frame(stats, {c: (lambda v: f"{float(v):.4f}") for c in ("mean", "min", "max")}
                                             | {"improved": lambda v: f"{float(v) * 100:.1f}%"})))
    section.figures.append(shuffle_figure(rows))
    return section


# ------------------------------------------------------------------------------ provenance


def _flatten_inputs(value: Any) -> Iterable[tuple[str, str]]:
    """(file name or "", sha256) from a provenance `inputs` value (a digest, a dict of them, or None)."""
    if isinstance(value, str):
        yield "", value
    elif isinstance(value, dict):
        for key, inner in sorted(value.items()):
            for item, digest in _flatten_inputs(inner):
                yield (f"{key}/{item}" if item else key), digest


def _record_model_dir(rel: str) -> str:
    """The model directory a record read: the prepared model, or the pruned model it evaluated."""
    parts = rel.split("/")
    if parts[0] in ("ppl", "zeroshot") and len(parts) == 4 and parts[2] != "dense":
        return f"pruned/{parts[1]}/{parts[2]}/{Path(parts[3]).stem}"
    return f"resources:models/{parts[1]}" if len(parts) > 1 else "?"


def _record_dataset(record: dict) -> str:
    for key in ("dataset", "heldout_dataset"):
        if isinstance(record.get(key), dict) and record[key].get("dataset"):
            return str(record[key]["dataset"])
    return "evaluation"


def record_checksums(rel: str, record: dict) -> list[tuple[str, str, str]]:
    """(role, location, sha256) of every checksum a record carries: provenance inputs and its own files."""
    out = []
    model_dir = _record_model_dir(rel)
    parts = rel.split("/")
    folder = str(Path(rel).parent)
    locations = {
        "model_weights": model_dir, "tokenizer": f"{model_dir}/tokenizer.json",
        "calibration_tokens": f"calibration/{parts[1]}/tokens.safetensors" if len(parts) > 1 else "",
        "eval_tokens": f"{_record_dataset(record)} token stream",
    }
    for role, value in sorted(record["provenance"].get("inputs", {}).items()):
        for item, digest in _flatten_inputs(value):
            where = locations.get(role, role)
            out.append((role.replace("_", " "), f"{where}/{item}" if item else where, digest))
    sparsity_dir = {"ppl": model_dir, "ablation": f"{rel} (model not kept)"}.get(parts[0], folder)
    own = {
        "file_sha256": ("calibration tokens file", f"{folder}/tokens.safetensors"),
        "tokens_sha256": ("calibration tokens tensor", f"{folder}/tokens.safetensors"),
        "sparsity_file_sha256": ("masks and permutations file", f"{folder}/sparsity.safetensors"),
        "masks_sha256": ("masks tensor", sparsity_dir if parts[0] == "ablation" else f"{sparsity_dir}/sparsity.safetensors"),
        "perms_sha256": ("permutations tensor", f"{sparsity_dir}/sparsity.safetensors"),
        "stream_sha256": ("eval tokens", locations["eval_tokens"]),
    }
    for key, (role, where) in own.items():
        if isinstance(record.get(key), str):
            out.append((role, where, record[key]))
    if isinstance(record.get("weights_sha256"), dict):
        out.extend(("model weights", f"{folder}/{name}", digest) for name, digest in sorted(record["weights_sha256"].items()))
    for key in ("dataset", "heldout_dataset"):
        dataset = record.get(key)
        if isinstance(dataset, dict):
            for relpath, digest in sorted((dataset.get("files") or {}).items()):
                out.append((f"data: {dataset.get('dataset')} ({dataset.get('source')})", relpath, digest))
    return out


def checksum_table(records: dict[str, dict]) -> pd.DataFrame:
    """Every distinct checksum once: what it is, where that file or tensor lives, how many records carry it."""
    seen: dict[str, dict] = {}
    for rel, record in records.items():
        for role, where, digest in record_checksums(rel, record):
            entry = seen.setdefault(digest, {"roles": {}, "where": {}, "records": set()})
            entry["roles"][role] = None
            entry["where"][where] = None
            entry["records"].add(rel)
    def places(where: dict) -> str:
        listed = list(where)
        return "; ".join(listed[:3]) + (f"; and {len(listed) - 3} more" if len(listed) > 3 else "")

    rows = [{"what": "; ".join(e["roles"]), "where": places(e["where"]), "sha256": digest,
             "records": len(e["records"])} for digest, e in seen.items()]
    rows.sort(key=lambda r: (r["where"], r["what"]))
    return pd.DataFrame(rows, columns=["what", "where", "sha256", "records"])


def _unique_rows(records: dict[str, dict], extract: Callable[[dict], dict]) -> pd.DataFrame:
    seen: dict[tuple, dict] = {}
    for rel, record in records.items():
        row = extract(record)
        key = tuple((k, str(v)) for k, v in row.items())
        if key not in seen:
            seen[key] = {**row, "records": 0}
        seen[key]["records"] += 1
    return pd.DataFrame(list(seen.values()))


def provenance_section(run: RunData) -> Section:
    section = Section("provenance", "Provenance")
    records = run.records
    if not records:
        section.absent = f"result JSONs with a provenance block: {ABSENT}"
        return section
    section.paragraphs.append(
        f"{len(records)} result records carry a provenance block (code, configuration hash, software, hardware, "
        "seeds, input checksums). Each distinct value is listed once with the number of records that carry it. "
        "Every file of the results directory, this report included, is listed with its sha256 in "
        "MANIFEST.sha256; `esparse audit RESULTS_DIR` re-checks all of them.")
    if run.config:
        from .provenance import config_hash

        section.paragraphs.append(f"Configuration of the report job: preset {run.config.get('preset')!r}, "
                                  f"config sha256 {config_hash(run.config)}.")

    def code(record):
        p = record["provenance"]
        return {"git commit": (p.get("code") or {}).get("git_commit"), "dirty": (p.get("code") or {}).get("git_dirty"),
                "config sha256": p.get("config_sha256")}

    section.tables.append(Table("Code and configuration", format_frame(_unique_rows(records, code))))

    software: dict[str, dict[str, int]] = {}
    for record in records.values():
        for name, version in (record["provenance"].get("software") or {}).items():
            software.setdefault(name, {}).setdefault(str(version), 0)
            software[name][str(version)] += 1
    section.tables.append(Table("Software versions", pd.DataFrame(
        [{"package": name, "version": "; ".join(v if len(versions) == 1 else f"{v} ({n} records)"
                                                for v, n in versions.items())}
         for name, versions in software.items()])))

    def hardware(record):
        p = record["provenance"]
        hw = p.get("hardware") or {}
        gpus = ", ".join(str(g.get("name")) + (f" ({g['memory_total_bytes'] / 2**30:.0f} GiB)"
                                                if g.get("memory_total_bytes") else "")
                         for g in hw.get("gpus") or []) or "none"
        return {"cpu": hw.get("cpu"), "cores": hw.get("cpu_count"), "torch threads": hw.get("torch_threads"),
                "platform": hw.get("platform"), "gpus": gpus, "driver": hw.get("driver", "")}

    section.tables.append(Table("Hardware", format_frame(_unique_rows(records, hardware))))
    evaluated = _unique_rows({k: r for k, r in records.items() if "device" in r["provenance"]},
                             lambda r: {"rule": r["provenance"].get("rule"), "device": r["provenance"].get("device"),
                                        "dtype": r["provenance"].get("dtype")})
    if len(evaluated):
        section.tables.append(Table("Device and dtype of the evaluation jobs", format_frame(evaluated)))

    seeds = _unique_rows({k: r for k, r in records.items() if r["provenance"].get("seeds")},
                         lambda r: {f"seed: {k}": v for k, v in sorted(r["provenance"]["seeds"].items())})
    if len(seeds):
        section.tables.append(Table("Seeds", format_frame(seeds)))

    section.tables.append(Table("Input and output checksums, each listed once",
                                format_frame(checksum_table(records))))

    committed = [s for s in run.sources.values() if s.found and s.name in GPU_TABLES]
    if committed:
        rows = []
        for source in committed:
            meta_path = source.path.with_suffix(".meta.json")
            meta = read_json(meta_path) if meta_path.is_file() else {}
            device = meta.get("device") or {}
            rows.append({"table": source.label, "sha256": source.sha256,
                         "device": device.get("name") if isinstance(device, dict) else device,
                         "date": meta.get("date", ""), "command": meta.get("command", ""),
                         "versions": ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())})
        section.tables.append(Table("Committed GPU tables (measured on the GPU machine, not by this run)",
                                    format_frame(pd.DataFrame(rows))))
    found = [s for s in run.sources.values() if s.found and s.name not in GPU_TABLES]
    section.tables.append(Table("Tables of this run", format_frame(pd.DataFrame(
        [{"table": s.label, "rows": len(s.frame), "sha256": s.sha256} for s in found],
        columns=["table", "rows", "sha256"]))))
    return section


# ------------------------------------------------------------------------------ summary and rendering


def findings(run: RunData) -> list[str]:
    """Plain sentences answering which method wins at which pattern, by how much, at what cost."""
    lines = []
    source = run.sources["wikitext_ppl"]
    if source.found and {"model", "method", "pattern", "seqlen", "windows", "ppl"} <= set(source.frame.columns):
        for row in ppl_winners(source.frame).to_dict("records"):
            text = (f"{row['model']}, {row['pattern']} (seqlen {row['seqlen']}, {row['windows']} windows): "
                    f"{row['best']} has the lowest perplexity, {fmt_ppl(row['ppl'])}")
            if row["runner-up"]:
                text += f", {row['margin'] * 100:.2f}% below {row['runner-up']} ({fmt_ppl(row['runner-up ppl'])})"
            if not _is_missing(row["dense ppl"]):
                text += f"; dense {fmt_ppl(row['dense ppl'])}"
            lines.append(text + ".")
    zs = run.sources["zeroshot"]
    if zs.found and {"metric", "task", "value", "model", "method", "pattern"} <= set(zs.frame.columns) \
            and "acc" in set(zs.frame["metric"]):
        pivot = zeroshot_pivot(zs.frame, "acc").reset_index()
        for (model, label), group in pivot.groupby(["model", "pattern"]):
            if label == "dense" or group.empty:
                continue
            best = group.sort_values("average", ascending=False).iloc[0]
            dense = pivot[(pivot["model"] == model) & (pivot["method"] == "dense")]
            samples = sorted(set(zs.frame.loc[zs.frame["model"] == model, "n"].dropna().astype(int))) \
                if "n" in zs.frame.columns else []
            lines.append(f"{model}, {label}: {best['method']} has the highest average zero-shot accuracy, "
                         f"{best['average']:.2f}% over {int(best['tasks'])} tasks"
                         + (f" (dense {dense['average'].iloc[0]:.2f}%)" if len(dense) else "")
                         + (f"; {'/'.join(map(str, samples))} samples per task" if samples else "") + ".")
    for name in ("kernels_h200",):
        ks = run.sources.get(name)
        if ks is None or not ks.found or not {"shape", "tokens", "backend", "ratio_vs_dense"} <= set(ks.frame.columns) \
                or "dispatch" not in set(ks.frame["backend"]):
            continue
        frame = ks.frame.copy()
        frame["shape_label"] = _shape_label(frame)
        medians = kernel_pivot(frame, "dispatch").loc["median over shapes"]
        parts = ", ".join(f"{fmt_ratio(v)} at {t} tokens" for t, v in medians.items() if not _is_missing(v))
        lines.append(f"{ks.label}: median per-GEMM speedup after dispatch over all shapes: {parts}.")
    return lines


def build_sections(run: RunData) -> list[Section]:
    return [wikitext_section(run), zeroshot_section(run), ablation_section(run), kernels_section(run),
            latency_memory_section(run), pruning_section(run), provenance_section(run)]


def absent_inputs(run: RunData) -> list[str]:
    return [f"{s.label}: {ABSENT}" for s in run.sources.values() if not s.found]


def _environment(template_dir: Path, autoescape: bool):
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), autoescape=autoescape,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(run: RunData, sections: list[Section], template_dir: str | os.PathLike = TEMPLATE_DIR,
           title: str | None = None) -> tuple[str, str]:
    """The HTML and Markdown texts of the report."""
    template_dir = Path(template_dir)
    context = {
        "title": title or f"esparse-bench report: {run.results_dir.name}",
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results_dir": str(run.results_dir),
        "findings": findings(run),
        "absent": absent_inputs(run),
        "sections": sections,
    }
    html = _environment(template_dir, autoescape=True).get_template("report.html.j2").render(**context)
    markdown = _environment(template_dir, autoescape=False).get_template("report.md.j2").render(**context)
    return html, markdown


def _write_readable(path: Path, data: bytes) -> None:
    """Atomic write, readable by everyone like any document (mkstemp would leave it 0600)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)


def build_report(results_dir: str | os.PathLike, out_html: str | os.PathLike, out_md: str | os.PathLike,
                 gpu_dir: str | os.PathLike | None = DEFAULT_GPU_DIR, config: dict | None = None,
                 template_dir: str | os.PathLike = TEMPLATE_DIR, title: str | None = None) -> dict:
    """Write the HTML report, the Markdown report and its figures/ folder; return what was rendered."""
    run = collect_run(results_dir, gpu_dir, config)
    sections = build_sections(run)
    html, markdown = render(run, sections, template_dir, title)
    out_md = Path(out_md)
    figures_dir = out_md.parent / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f.filename for s in sections for f in s.figures}
    for stale in figures_dir.glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()
    for section in sections:
        for figure in section.figures:
            _write_readable(figures_dir / figure.filename, figure.png)
    _write_readable(out_md, markdown.encode())
    _write_readable(out_html, html.encode())
    summary = {
        "sections": {s.key: ("absent" if s.absent else f"{len(s.tables)} tables, {len(s.figures)} figures")
                     for s in sections},
        "figures": sorted(wanted),
        "absent": absent_inputs(run),
        "records": len(run.records),
    }
    log.info("report written: %s, %s (%s)", out_html, out_md, summary["sections"])
    return summary


# ------------------------------------------------------------------------------ command line


def configure_parser(parser) -> None:
    parser.add_argument("results_dir", help="the results directory of a run")
    parser.add_argument("--out-dir", default=None, help="where report.html, report.md and figures/ go "
                                                        "(default RESULTS_DIR/report)")
    parser.add_argument("--gpu-dir", default=str(DEFAULT_GPU_DIR),
                        help="folder of committed GPU tables (kernels_h200.csv, ...); 'none' to leave them out")
    parser.add_argument("--title", default=None)
    parser.add_argument("--no-manifest", action="store_true",
                        help="do not (re)write RESULTS_DIR/MANIFEST.sha256 after the report")


def run_cli(args) -> int:
    from .audit import write_manifest

    results = Path(args.results_dir)
    out_dir = Path(args.out_dir) if args.out_dir else results / "report"
    gpu_dir = None if str(args.gpu_dir).lower() == "none" else args.gpu_dir
    summary = build_report(results, out_dir / "report.html", out_dir / "report.md", gpu_dir=gpu_dir, title=args.title)
    for key, state in summary["sections"].items():
        print(f"{key:12s} {state}")
    for line in summary["absent"]:
        print(f"absent: {line}")
    print(f"wrote {out_dir / 'report.html'} and {out_dir / 'report.md'}")
    if not args.no_manifest:
        path = write_manifest(results)
        print(f"wrote {path}")
    return 0
