"""Parity check, run by hand: esparse's zero-shot path against a direct `lm_eval.simple_evaluate`.

Path A: `esparse.zeroshot.evaluate_zeroshot` on the model loaded in memory by `esparse.models`
(mirror task configs generated into --tasks-dir). Path B: lm-eval alone, `simple_evaluate(model="hf",
model_args={"pretrained": <dir>})`, loading the same directory itself, with a TaskManager over the
same generated configs. Per task, the script compares every metric, the sample counts, lm-eval's
task hash and each document's log-likelihoods, and checks the full record counts against the data
README. Exit status 1 on any difference.

    python tests/zeroshot_parity_check.py --model-dir resources/models/smollm2-135m \
        --mirror ../shared/data --limit 50 --out /tmp/zeroshot_parity.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

# Record counts of the evaluated split, copied from the data README (shared/data/README.md).
README_RECORDS = {
    "piqa": 1838,
    "logiqa": 651,
    "winogrande": 1267,
    "openbookqa": 500,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "sciq": 1000,
    "rte": 277,
    "boolq_mirror": 3270,
    "hellaswag_mirror": 10042,
}
MUST_SHOW_TASKS = ["piqa", "sciq", "openbookqa", "logiqa", "arc_easy", "arc_challenge", "winogrande", "rte"]


def run_esparse(model_dir, tasks, mirror, limit, batch_size, tasks_dir):
    from esparse.models import load_model
    from esparse.zeroshot import evaluate_zeroshot

    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    results = evaluate_zeroshot(model, tokenizer, tasks, mirror, limit=limit, batch_size=batch_size,
                                device="cpu", tasks_dir=tasks_dir, keep_samples=True)
    del model
    gc.collect()
    return results


def run_direct(model_dir, task_names, limit, batch_size, tasks_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from esparse.zeroshot import task_hashes

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=task_names,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )
    results["task_hashes"] = task_hashes(results["samples"])
    return json.loads(json.dumps(results, default=handle_non_serializable))


def _loglikelihoods(samples):
    return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in samples}


def compare(a, b):
    report, problems = {}, []
    for task in sorted(a["results"]):
        ra, rb = a["results"][task], b["results"].get(task)
        if rb is None:
            problems.append(f"{task}: missing from the direct run")
            continue
        metric_keys = sorted(k for k in ra if "," in k)
        differing = [k for k in metric_keys if ra[k] != rb.get(k)]
        lla, llb = _loglikelihoods(a["samples"][task]), _loglikelihoods(b["samples"][task])
        ll_diff = max((abs(x - y) for d in lla for x, y in zip(lla[d], llb.get(d, []))), default=0.0)
        same_docs = set(lla) == set(llb) and all(len(lla[d]) == len(llb[d]) for d in lla)
        original = a["n-samples"][task]["original"]
        row = {
            "acc": ra.get("acc,none"),
            "acc_norm": ra.get("acc_norm,none"),
            "acc_stderr": ra.get("acc_stderr,none"),
            "direct_acc": rb.get("acc,none"),
            "direct_acc_norm": rb.get("acc_norm,none"),
            "n_effective": a["n-samples"][task]["effective"],
            "n_records": original,
            "readme_records": README_RECORDS.get(task),
            "metrics_identical": not differing,
            "task_hash_identical": a["task_hashes"][task] == b["task_hashes"][task],
            "max_abs_loglik_diff": ll_diff,
            "source": a["esparse"]["tasks"][task]["source"],
        }
        report[task] = row
        if differing:
            problems.append(f"{task}: metrics differ: {[(k, ra[k], rb.get(k)) for k in differing]}")
        if a["n-samples"][task] != b["n-samples"][task]:
            problems.append(f"{task}: n-samples differ {a['n-samples'][task]} vs {b['n-samples'][task]}")
        if not row["task_hash_identical"]:
            problems.append(f"{task}: task hashes differ (documents, prompts or targets)")
        if not same_docs or ll_diff != 0.0:
            problems.append(f"{task}: per-document log-likelihoods differ (max {ll_diff})")
        if README_RECORDS.get(task) != original:
            problems.append(f"{task}: {original} records, data README says {README_RECORDS.get(task)}")
    return report, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--mirror", required=True)
    parser.add_argument("--tasks", nargs="+", default=MUST_SHOW_TASKS)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks-dir", default=None, help="where to generate task configs (default: temp)")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="zeroshot-parity-") as tmp:
        tasks_dir = Path(args.tasks_dir or tmp)
        start = time.time()
        a = run_esparse(args.model_dir, args.tasks, args.mirror, args.limit, args.batch_size, tasks_dir)
        time_a = time.time() - start
        start = time.time()
        b = run_direct(args.model_dir, sorted(a["results"]), args.limit, args.batch_size, tasks_dir)
        time_b = time.time() - start

    report, problems = compare(a, b)
    print(f"{'task':<18}{'source':<15}{'n':>5}{'records':>9}{'acc':>9}{'acc_norm':>10}"
          f"{'direct acc':>12}{'direct norm':>13}  identical")
    for task, row in report.items():
        norm = "" if row["acc_norm"] is None else f"{row['acc_norm']:.4f}"
        dnorm = "" if row["direct_acc_norm"] is None else f"{row['direct_acc_norm']:.4f}"
        same = row["metrics_identical"] and row["task_hash_identical"] and row["max_abs_loglik_diff"] == 0.0
        print(f"{task:<18}{row['source']:<15}{row['n_effective']:>5}{row['n_records']:>9}{row['acc']:>9.4f}"
              f"{norm:>10}{row['direct_acc']:>12.4f}{dnorm:>13}  {same}")
    print(f"esparse path {time_a:.0f} s, direct lm-eval path {time_b:.0f} s")
    for problem in problems:
        print("MISMATCH:", problem)
    if args.out:
        summary = {"model_dir": str(Path(args.model_dir).resolve()), "limit": args.limit,
                   "batch_size": args.batch_size, "tasks": report, "problems": problems,
                   "seconds": {"esparse": time_a, "direct": time_b},
                   "lm_eval_version": a.get("lm_eval_version"), "task_hashes": a["task_hashes"]}
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
