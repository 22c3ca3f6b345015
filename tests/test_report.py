"""The run report: built from a real (tiny) run, rendered in headless Chromium, readable as Markdown.

The results directory comes from the pipeline's own steps (calibrate, prune, perplexity, table) on
a tiny random LLaMA; `build_tiny_results` is shared with tests/test_audit.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from esparse import report
from esparse.audit import MANIFEST_NAME, read_manifest, write_manifest
from esparse.io import read_json, sha256_file, write_json

REPO = Path(__file__).resolve().parents[1]
TINY_PAIRS = (("magnitude", "2:4"), ("esparse", "2:4"), ("wanda", "unstructured50"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ a tiny real run


def tiny_config() -> dict:
    from esparse.config import CONFIG_DIR, _load_yaml, available_presets, deep_merge

    config = deep_merge(_load_yaml(CONFIG_DIR / "config.yaml"), available_presets()["smoke"])
    config.update(preset="smoke", models=["tiny"])
    config["calibration"].update(nsamples=4, seqlen=64)
    config["perplexity"].update(seqlen=64, max_windows=4)
    return config


def build_tiny_results(root: Path, mirror: Path, pairs=TINY_PAIRS) -> dict:
    """A results directory made by the real pipeline steps on a tiny random model (smoke-preset settings).

    Layout as the workflow writes it: root/results/{calibration,pruned,ppl,tables}/ and the dense
    model in root/resources/models/tiny (with the esparse_model.json that prepare_model writes).
    """
    from esparse.data import load_records
    from esparse.models import save_tiny_model
    from esparse.pipeline import (ablation_step, ablation_table_step, ablation_variants, calibrate_step,
                                  kernel_build_step, perplexity_step, ppl_table_step, prune_step)
    from esparse.pruning.pattern import SparsityPattern

    config = tiny_config()
    results, resources = root / "results", root / "resources"
    texts = [row for row in load_records("wikitext2", mirror)["text"][:3000] if row]
    model_dir = save_tiny_model("llama", resources / "models" / "tiny", texts, seed=0)
    write_json(model_dir / "esparse_model.json", {
        "ref": "tiny", "kind": "local", "dtype": "float32",
        "weights_sha256": {p.name: sha256_file(p) for p in sorted(model_dir.glob("*.safetensors"))},
        "tokenizer_sha256": sha256_file(model_dir / "tokenizer.json"),
    })
    tokens = results / "calibration" / "tiny" / "tokens.safetensors"
    calibrate_step(str(model_dir), "c4_calibration", str(mirror), 4, 64, 0, str(tokens),
                   str(results / "calibration" / "tiny" / "calibration.json"), config, {"model": "tiny"})
    ppl_jsons = []

    def evaluate(model_path: Path, method: str, slug: str) -> None:
        out = results / "ppl" / "tiny" / method / f"{slug}.json"
        perplexity_step(str(model_path), "wikitext2", str(mirror), 64, 4, "cpu", "float32", str(out), config,
                        {"model": "tiny", "method": method, "pattern": slug})
        ppl_jsons.append(str(out))

    evaluate(model_dir, "dense", "dense")
    for method, pattern in pairs:
        slug = SparsityPattern.parse(pattern).slug
        pruned = results / "pruned" / "tiny" / method / slug
        prune_step(str(model_dir), str(tokens), method, pattern, config["method_settings"].get(method, {}),
                   str(pruned), "cpu", "float32", config, {"model": "tiny", "method": method, "pattern": slug})
        evaluate(pruned, method, slug)
    ppl_table_step(ppl_jsons, str(results / "tables" / "wikitext_ppl.csv"))
    ablation = config["ablation"]
    variants = ablation_variants(ablation, config["method_settings"]["esparse"])
    ablation_jsons = []
    for variant, settings in variants.items():
        out = results / "ablation" / "tiny" / f"{variant}.json"
        ablation_step(str(model_dir), str(tokens), settings, ablation["pattern"], ablation["dataset"], str(mirror),
                      64, 2, "cpu", "float32", str(out), config, {"model": "tiny", "variant": variant})
        ablation_jsons.append(str(out))
    ablation_table_step(ablation_jsons, config["method_settings"]["esparse"], str(results / "tables" / "ablation.csv"),
                        str(results / "tables" / "ablation_choice.json"))
    for method in ("magnitude", "esparse"):  # CPU-reference kernel plans (packing only, no timing)
        kernel_build_step(str(results / "pruned" / "tiny" / method / "2of4"),
                          str(results / "kernels" / "tiny" / method / "2of4"), [1, 16, 2048], "cpu")
    return {"root": root, "results": results, "resources": resources, "config": config}


def tiny_run(tmp_path_factory, mirror: Path) -> dict:
    """Built once per test session (shared by the report and audit tests); callers copy before changing it."""
    root = tmp_path_factory.getbasetemp() / "esparse_tiny_run"
    done = root / "BUILT"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        build_tiny_results(root, mirror)
        done.write_text("ok\n")
    return {"root": root, "results": root / "results", "resources": root / "resources", "config": tiny_config()}


def copy_run(run: dict, dest: Path) -> dict:
    shutil.copytree(run["root"], dest)
    return {**run, "root": dest, "results": dest / "results", "resources": dest / "resources"}


def finish_run(run: dict, gpu_dir: Path | None = None) -> dict:
    """What the report rule does: the report, then the manifest over everything."""
    out = run["results"] / "report"
    summary = report.build_report(run["results"], out / "report.html", out / "report.md", gpu_dir=gpu_dir,
                                  config=run["config"])
    write_manifest(run["results"])
    return {**run, "html": out / "report.html", "md": out / "report.md", "summary": summary}


# ------------------------------------------------------------------------------ rendering-only tables
# The zero-shot, kernel, latency and memory tables are produced by other rules (some
# only on a GPU); these small tables in their column layouts exercise the rendering and are not
# results of anything.


def write_rendering_tables(results: Path, gpu_dir: Path) -> dict:
    tables = results / "tables"
    zeroshot = pd.DataFrame([
        {"model": "tiny", "method": method, "pattern": pattern, "task": task, "metric": metric,
         "value": value, "stderr": 0.01, "n": 50, "source": "mirror"}
        for (method, pattern, base) in (("dense", "dense", 0.60), ("magnitude", "2of4", 0.50), ("esparse", "2of4", 0.55))
        for task, offset in (("piqa", 0.0), ("sciq", 0.10), ("hellaswag", -0.2))
        for metric, value in (("acc", base + offset), ("acc_norm", base + offset + 0.02))
    ])
    zeroshot.to_csv(tables / "zeroshot.csv", index=False)
    pd.DataFrame([{"model": "tiny", "method": "dense", "shuffle": "", "batch": 1, "phase": "decode",
                   "status": "not measured: no CUDA device", "median_ms": None}]).to_csv(tables / "latency.csv", index=False)
    pd.DataFrame([{"model": "tiny", "method": "dense", "shuffle": "", "batch": 1, "phase": "decode",
                   "status": "not measured: no CUDA device", "weight_bytes": None}]).to_csv(tables / "memory.csv", index=False)
    gpu_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape, n, k in (("llama-7b.q", 4096, 4096), ("llama-7b.down", 4096, 11008)):
        for tokens, dense_us in ((1, 13.5), (16, 15.0), (2048, 300.0)):
            limit = 1.78 if tokens == 1 else (1.6 if tokens == 16 else 2.0)
            for backend, ratio in (("dense", 1.0), ("ours", 1.5), ("cusparselt", 0.8), ("dispatch", 1.5)):
                rows.append({"shape": shape, "model": "llama-7b", "out_features": n, "in_features": k, "tokens": tokens,
                             "backend": backend, "median_us": dense_us / ratio, "ratio_vs_dense": ratio,
                             "ratio_limit": None if backend == "dense" else limit, "device": "rendering fixture"})
    pd.DataFrame(rows).to_csv(gpu_dir / "kernels_h200.csv", index=False)
    pd.DataFrame([{"model": "llama-7b-shape", "method": m, "shuffle": s, "batch": 1, "context": 2048, "phase": "decode",
                   "weight_bytes": w, "max_memory_allocated_bytes": w + 2**30}
                  for m, s, w in (("dense", "no", 13 * 2**30), ("esparse", "yes", 7.4 * 2**30))]
                 ).to_csv(gpu_dir / "memory_h200.csv", index=False)
    return {"zeroshot": zeroshot, "kernels": pd.DataFrame(rows)}


# ------------------------------------------------------------------------------ headless Chromium


def chromium_binary() -> str:
    """The Debian `chromium` binary, installed with apt-get when missing (as root); skip otherwise."""
    def find():
        for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        return None

    found = find()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (no apt-get or not root); "
                    "install the Debian `chromium` package to run the rendering test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "fonts-liberation"]
    for cmd in (["apt-get", "update", "-q"], install):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if proc.returncode != 0:
            pytest.skip(f"installing chromium with apt-get failed ({' '.join(cmd)}): {proc.stderr[-500:]}")
    found = find()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary was found")
    return found


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, user_data_dir: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "--window-size=1400,1000",
             "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire_pipes, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                self.events.append(message)
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
                self._buffer += chunk

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        request = self._send(method, params, session)
        answer = self.wait_for(lambda m: m.get("id") == request)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def render_in_chromium(html: Path, screenshot: Path) -> dict:
    """Load `html`, collect console errors, exceptions, log errors, requests and image sizes, screenshot it."""
    with tempfile.TemporaryDirectory(prefix="esparse-chromium-") as profile:
        browser = Chromium(chromium_binary(), Path(profile))
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
                browser.call(domain, session=session)
            browser.call("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
            browser.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
            images = json.loads(browser.call("Runtime.evaluate", {
                "expression": "JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 40), "
                              "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))",
                "returnByValue": True}, session=session)["result"]["value"])
            text = browser.call("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True},
                                session=session)["result"]["value"]
            shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.close()
    events = browser.events
    errors = [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
              and e["params"].get("type") in ("error", "assert")]
    errors += [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in events if e.get("method") == "Log.entryAdded"
               and e["params"]["entry"].get("level") == "error"]
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {"errors": errors, "images": images, "requests": requests, "text": text}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def plain_report(tmp_path_factory, data_mirror):
    """The tiny run as the workflow leaves it (only the perplexity table), with its report."""
    run = copy_run(tiny_run(tmp_path_factory, data_mirror), tmp_path_factory.mktemp("plain") / "run")
    return finish_run(run, gpu_dir=None)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, data_mirror):
    """The tiny run plus rendering tables for every other section, including committed GPU tables."""
    run = copy_run(tiny_run(tmp_path_factory, data_mirror), tmp_path_factory.mktemp("full") / "run")
    gpu_dir = run["root"] / "gpu"
    fixtures = write_rendering_tables(run["results"], gpu_dir)
    return {**finish_run(run, gpu_dir=gpu_dir), **fixtures, "gpu_dir": gpu_dir}


# ------------------------------------------------------------------------------ tests


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    screenshot = tmp_path / "report.png"
    seen = render_in_chromium(full_report["html"], screenshot)
    assert seen["errors"] == []
    expected = sum(len(s.figures) for s in report.build_sections(report.collect_run(
        full_report["results"], full_report["gpu_dir"])))
    assert expected >= 5
    assert len(seen["images"]) == expected
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in seen["images"]), seen["images"]
    assert all(i["src"].startswith("data:image/png;base64,") for i in seen["images"])
    assert [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []
    for heading in ("WikiText-2 perplexity", "Zero-shot accuracy", "Per-GEMM 2:4 kernel speedups",
                    "End-to-end latency and memory", "channel-shuffle efficacy", "Provenance"):
        assert heading in seen["text"]
    width, height = png_size(screenshot.read_bytes())
    assert width >= 1000 and height > 3000, (width, height)  # a long page of tables and figures
    assert screenshot.stat().st_size > 100_000
    keep = os.environ.get("ESPARSE_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)


def test_plain_run_report_renders_and_names_absent_tables(plain_report, tmp_path):
    seen = render_in_chromium(plain_report["html"], tmp_path / "plain.png")
    assert seen["errors"] == []
    assert seen["images"] and all(i["width"] > 0 for i in seen["images"])
    md = plain_report["md"].read_text()
    for rel in ("tables/zeroshot.csv", "tables/latency.csv", "tables/memory.csv"):
        assert f"{rel}: {report.ABSENT}" in md
        assert f"{rel}: {report.ABSENT}" in seen["text"]
    assert plain_report["summary"]["sections"]["zeroshot"] == "absent"
    assert plain_report["summary"]["sections"]["wikitext"] != "absent"
    assert plain_report["summary"]["sections"]["ablation"] != "absent"
    assert "held-apart C4" in md and "tables/ablation.csv: not run" not in md
    assert "Sparse-kernel build plans" in md and "no CUDA device" in md


def test_html_is_self_contained(full_report):
    html = full_report["html"].read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html), "only data URIs and in-page anchors allowed"
    assert "@import" not in html and "url(" not in html


def test_markdown_is_plain_text_with_pipe_tables_and_png_files(full_report):
    md_path = full_report["md"]
    md = md_path.read_text()
    assert "<" not in md.replace("<=", "").replace("->", ""), "no HTML in the Markdown report"
    assert "base64" not in md
    assert re.search(r"^\|.*\|$", md, re.M) and re.search(r"^\|[-:| ]+\|$", md, re.M)
    assert md.count("\n## ") >= 7
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert len(figures) >= 5
    for rel in figures:
        data = (md_path.parent / rel).read_bytes()
        width, height = png_size(data)
        assert width > 200 and height > 100
    assert sorted(p.name for p in (md_path.parent / "figures").glob("*.png")) == sorted(Path(f).name for f in figures)


def test_every_perplexity_appears_in_both_reports(plain_report):
    table = pd.read_csv(plain_report["results"] / "tables" / "wikitext_ppl.csv")
    html, md = plain_report["html"].read_text(), plain_report["md"].read_text()
    for row in table.itertuples():
        text = report.fmt_ppl(row.ppl)
        assert text in md and text in html, (row.method, row.pattern, text)
    assert "seqlen 64, 4 of" in md
    for model in ("LLaMA-2-7B", "LLaMA-2-70B", "LLaMA-13B"):
        assert model in md
    assert "4096" in md and "2048" in md  # the published seqlens beside ours


def test_ppl_pivot_and_winners_match_the_table(plain_report):
    table = pd.read_csv(plain_report["results"] / "tables" / "wikitext_ppl.csv")
    pivot = report.ppl_pivot(table)
    for row in table.itertuples():
        label = report.pattern_label(row.pattern)
        assert pivot.loc[(row.model, row.seqlen, row.windows, row.method), label] == row.ppl
    assert list(pivot.columns[:1]) == ["dense"]
    winners = report.ppl_winners(table)
    for item in winners.to_dict("records"):
        same = table[(table["pattern"].map(report.pattern_label) == item["pattern"]) & (table["method"] != "dense")]
        assert item["ppl"] == same["ppl"].min()
        assert item["best"] == same.loc[same["ppl"].idxmin(), "method"]


def test_zeroshot_average_is_recomputed(full_report):
    frame = full_report["zeroshot"]
    pivot = report.zeroshot_pivot(frame, "acc")
    for (model, method, pattern), row in pivot.iterrows():
        chosen = frame[(frame["method"] == method) & (frame["metric"] == "acc")]
        assert row["average"] == pytest.approx(chosen["value"].mean() * 100)
        assert row["tasks"] == 3
    md = full_report["md"].read_text()
    assert f"{pivot.loc[('tiny', 'esparse', '2:4'), 'average']:.2f}" in md


def test_kernel_tables_mark_the_limit_and_median(full_report):
    frame = full_report["kernels"].copy()
    frame["shape_label"] = report._shape_label(frame)
    pivot = report.kernel_pivot(frame, "dispatch")
    assert "median over shapes" in pivot.index
    assert pivot.loc["median over shapes", 1] == pytest.approx(1.5)
    limit = report.kernel_limit(frame)
    assert limit.loc[("llama-7b.q (4096x4096)", 1)] == pytest.approx(1.78)
    md = full_report["md"].read_text()
    assert "physical limit" in md and "1.78x" in md


def test_kernel_limit_falls_back_to_design_limits():
    frame = pd.DataFrame([{"shape": "s", "out_features": 8, "in_features": 8, "tokens": t, "backend": b,
                           "ratio_vs_dense": 1.0} for t in (1, 64, 4096) for b in ("dense", "ours")])
    frame["shape_label"] = report._shape_label(frame)
    limit = report.kernel_limit(frame)
    assert limit.loc[("s (8x8)", 1)] == report.LIMIT_MEMORY_BOUND
    assert limit.loc[("s (8x8)", 4096)] == report.LIMIT_COMPUTE_BOUND
    assert pd.isna(limit.loc[("s (8x8)", 64)])


def test_provenance_lists_every_input_checksum_once(plain_report):
    run = report.collect_run(plain_report["results"], None)
    expected = set()
    for rel, record in run.records.items():
        expected.update(digest for _, _, digest in report.record_checksums(rel, record))
    md = plain_report["md"].read_text()
    section = md.split("## Provenance", 1)[1]
    table = section.split("### Input and output checksums, each listed once", 1)[1].split("###", 1)[0]
    for digest in expected:
        assert table.count(digest) >= 1, digest
    listed = re.findall(r"\| ([0-9a-f]{64}) \|", table)
    assert sorted(listed) == sorted(set(listed)) and set(listed) == expected
    dense = read_json(plain_report["results"] / "ppl" / "tiny" / "dense" / "dense.json")
    assert dense["provenance"]["software"]["torch"] in section
    assert dense["provenance"]["hardware"]["cpu"] in section


def test_manifest_covers_the_report_and_every_result(plain_report):
    listed = read_manifest(plain_report["results"] / MANIFEST_NAME)
    for rel in ("report/report.html", "report/report.md", "tables/wikitext_ppl.csv", "ppl/tiny/dense/dense.json",
                "pruned/tiny/esparse/2of4/sparsity.safetensors", "calibration/tiny/tokens.safetensors"):
        assert rel in listed
    assert MANIFEST_NAME not in listed
    for rel, digest in listed.items():
        assert sha256_file(plain_report["results"] / rel) == digest


def test_cli_report_writes_report_and_manifest(plain_report, tmp_path, capsys):
    from esparse.cli import main

    results = tmp_path / "results"
    shutil.copytree(plain_report["results"], results)
    (results / MANIFEST_NAME).unlink()
    assert main(["report", str(results), "--gpu-dir", "none", "--out-dir", str(results / "report")]) == 0
    out = capsys.readouterr().out
    assert "absent: tables/zeroshot.csv" in out
    assert (results / MANIFEST_NAME).is_file() and (results / "report" / "report.html").is_file()


def test_missing_results_dir_is_a_clear_error(tmp_path, capsys):
    from esparse.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "results directory" in capsys.readouterr().err


def test_a_table_without_the_expected_columns_is_shown_as_written(tmp_path):
    results, gpu = tmp_path / "results", tmp_path / "gpu"
    (results / "tables").mkdir(parents=True)
    gpu.mkdir()
    pd.DataFrame([{"shape": "q", "tokens": 1, "time": 3.5}]).to_csv(gpu / "kernels_h200.csv", index=False)
    run = report.collect_run(results, gpu)
    section = report.kernels_section(run)
    assert any("lacks the column(s) backend, ratio_vs_dense" in p for p in section.paragraphs)
    assert section.tables and "3.5" in section.tables[0].markdown()
    html, md = report.render(run, report.build_sections(run))
    assert "tables/wikitext_ppl.csv: not run in this configuration" in md and "<html" in html
