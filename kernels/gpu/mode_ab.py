"""A/B of the CUDA decode kernel's configuration families from one benchmark run's tuning records.

Every candidate configuration the tuner timed is in `<csv>.tuning.jsonl`. On the same machine and
in the same run, this takes per (shape, tokens) the best configuration of each set of families,
each against the dense baseline timed there. `--by mode` (activation modes):

- `gather`: activations gathered by every CTA into shared memory (no extra launch);
- `+pre`: also x[:, perm] staged once by a second launch and copied to shared memory per CTA;
- `+direct`: also the staged fragments read from global memory where the MMAs use them.

`--by warps`: `w4-8` (CTAs of 4 or 8 warps) against `+w1-2` (also 1 and 2 warps).

`--by cluster`: `workspace` (split-K partials summed through a global workspace) against `+cluster`
(also the cluster reduction of 2-8 splits in distributed shared memory).

    python kernels/gpu/mode_ab.py reports/gpu/h100/kernels_h100_d5.tuning.jsonl.gz
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics

FAMILY_SETS = {
    "mode": {"gather": {"gather"}, "+pre": {"gather", "pre"}, "+direct": {"gather", "pre", "direct"}},
    "warps": {"w4-8": {"w4", "w8"}, "+w1-2": {"w1", "w2", "w4", "w8"}},
    "cluster": {"workspace": {"workspace"}, "+cluster": {"workspace", "cluster"}},
}


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as fh:
            records.extend(json.loads(line) for line in fh if line.strip())
    return records


def config_family(config: dict, by: str) -> str:
    if by == "warps":
        return f"w{config.get('warps', 4)}"
    if by == "cluster":
        return "cluster" if config.get("cluster") else "workspace"
    if config.get("direct"):
        return "direct"
    return "pre" if config.get("pre") else "gather"


def best_times(records: list[dict], by: str = "mode") -> dict[tuple[str, int], dict[str, float]]:
    """Per (shape, tokens): the dense median and the best median of each family set."""
    best: dict[tuple[str, int], dict[str, float]] = collections.defaultdict(dict)
    for record in records:
        key = (record["shape"], record["tokens"])
        median = record.get("median_us")
        if median is None or median != median:  # not measured (NaN)
            continue
        if record["backend"] == "dense":
            best[key]["dense"] = median
        elif record["backend"] == "ours_cuda":
            family = config_family(record["config"], by)
            for name, families in FAMILY_SETS[by].items():
                if family in families:
                    best[key][name] = min(best[key].get(name, float("inf")), median)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tuning", nargs="+", help="tuning .jsonl (or .jsonl.gz) files of one run")
    parser.add_argument("--by", choices=sorted(FAMILY_SETS), default="mode", help="families to compare")
    args = parser.parse_args()
    best = best_times(read_records(args.tuning), args.by)
    by_tokens = collections.defaultdict(lambda: collections.defaultdict(list))
    for (shape, tokens), times in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        if "dense" not in times:
            continue
        cells = []
        for name in FAMILY_SETS[args.by]:
            if name in times:
                ratio = times["dense"] / times[name]
                by_tokens[tokens][name].append(ratio)
                cells.append(f"{name} {times[name]:8.2f} us ({ratio:.3f}x)")
        print(f"{shape:20s} T={tokens:2d} dense {times['dense']:8.2f} us  " + "  ".join(cells))
    for tokens, ratios in sorted(by_tokens.items()):
        print(f"T={tokens}: median ratio vs dense " + ", ".join(
            f"{name} {statistics.median(values):.3f} ({len(values)} shapes)" for name, values in ratios.items()))


if __name__ == "__main__":
    main()
