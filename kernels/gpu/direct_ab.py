"""A/B of the CUDA decode kernel's `direct` mode from one benchmark run's tuning records.

Every candidate configuration the tuner timed is in `<csv>.tuning.jsonl`; on the same machine and in
the same run, this compares per (shape, tokens) the best staged configuration (B fragments copied to
shared memory) with the best of all (direct included), each against the dense baseline timed there.

    python kernels/gpu/direct_ab.py reports/gpu/h100/kernels_h100_d4.tuning.jsonl.gz
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as fh:
            records.extend(json.loads(line) for line in fh if line.strip())
    return records


def best_times(records: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    best: dict[tuple[str, int], dict[str, float]] = collections.defaultdict(dict)
    for record in records:
        key = (record["shape"], record["tokens"])
        median = record.get("median_us")
        if median is None or median != median:  # not measured (NaN)
            continue
        if record["backend"] == "dense":
            best[key]["dense"] = median
        elif record["backend"] == "ours_cuda":
            kinds = ["all"] if record["config"].get("direct") else ["staged", "all"]
            for kind in kinds:
                best[key][kind] = min(best[key].get(kind, float("inf")), median)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tuning", nargs="+", help="tuning .jsonl (or .jsonl.gz) files of one run")
    args = parser.parse_args()
    best = best_times(read_records(args.tuning))
    by_tokens = collections.defaultdict(list)
    for (shape, tokens), times in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        if not {"dense", "staged", "all"} <= times.keys():
            continue
        staged, overall = times["dense"] / times["staged"], times["dense"] / times["all"]
        by_tokens[tokens].append((staged, overall))
        print(f"{shape:20s} T={tokens:2d} dense {times['dense']:8.2f} us  staged {times['staged']:8.2f} us "
              f"({staged:.3f}x)  with direct {times['all']:8.2f} us ({overall:.3f}x)")
    for tokens, pairs in sorted(by_tokens.items()):
        print(f"T={tokens}: median ratio vs dense, staged only {statistics.median(s for s, _ in pairs):.3f}, "
              f"with direct {statistics.median(o for _, o in pairs):.3f} ({len(pairs)} shapes)")


if __name__ == "__main__":
    main()
