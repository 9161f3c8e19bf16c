"""Benchmark: sd2's SparseGPT against llm-compressor's (`oneshot` + SparseGPTModifier), written as JSON.

    python3 -m venv bench/.venv-llmcompressor
    bench/.venv-llmcompressor/bin/pip install "torch==2.13.0" "llmcompressor==0.14.0.1"
    .venv/bin/python bench/prune_vs_llmcompressor.py --out bench/results/prune_vs_llmcompressor.json

Same model (the embedded SmolLM2-135M-Instruct), the same calibration tokens (sd2's shipped text through
`load_calibration`, saved to a file that both sides read), the same sparsities, blocksize 128, dampening 0.01. Each
pruning runs in its own subprocess (llm-compressor in its own virtualenv, its pins conflict with sd2's), which
reports the pruning call's wall time and its own peak RSS (VmHWM; getrusage's ru_maxrss is kept too, but it
includes this process's RSS at fork time) and saves the pruned decoder Linears. This process then
measures their sparsity and their perplexity on held-out WikiText-2 test text (bench/data, 2048-token windows),
with one evaluation code path for both tools. A calibration setting larger than the shipped text allows is cut to
the full windows there are (no padding, no repeated windows), and the JSON says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLMC_PYTHON = HERE / ".venv-llmcompressor" / "bin" / "python"
EVAL_TEXT = HERE / "data" / "wikitext2_test_subset.raw"


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Every Linear inside the decoder layers, by state-dict prefix (what both tools prune)."""
    return {
        f"model.layers.{i}.{name}": module
        for i, layer in enumerate(model.model.layers)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def child(args: argparse.Namespace) -> None:
    """Prune one model in this process; write the pruned decoder Linears and {seconds, peak_rss_mb}."""
    torch.set_num_threads(args.threads)
    ids = torch.load(args.calib)
    dense = args.sparsity != "2:4"
    if args.child == "sd2":
        from sd2_core.models import load_model
        from sd2_core.pruning.model_pruner import prune_model

        model = load_model(Path(args.model_dir))
        start = time.perf_counter()
        prune_model(model, ids, torch.ones_like(ids), args.sparsity, blocksize=128, percdamp=0.01)
        version = "sd2 (this tree)"
    else:
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        modifier = SparseGPTModifier(
            sparsity=float(args.sparsity) if dense else 0.5,
            mask_structure="0:0" if dense else "2:4",
            block_size=128,
            dampening_frac=0.01,
            targets=["Linear"],
            ignore=["re:.*lm_head"],  # tied to the embeddings; sd2 prunes decoder Linears only
        )
        start = time.perf_counter()
        oneshot(
            model=model,
            dataset=data,
            recipe=modifier,
            num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False,
        )
        version = f"llmcompressor {llmcompressor.__version__}"
    seconds = time.perf_counter() - start
    weights = {f"{name}.weight": m.weight.detach().contiguous() for name, m in decoder_linears(model).items()}
    torch.save(weights, args.save)
    # VmHWM is this process's own peak: ru_maxrss also keeps the parent's RSS at fork time across execve
    status = Path("/proc/self/status").read_text().split("\n")
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {"seconds": seconds, "peak_rss_mb": hwm_kb / 1024, "ru_maxrss_mb": maxrss_kb / 1024, "version": version}
    Path(args.report).write_text(json.dumps(report))


def perplexity(model, ids: torch.Tensor, seq_len: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of seq_len tokens (a tail shorter than that is dropped)."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(ids.numel() // seq_len):
            window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0)
            logits = model(input_ids=window).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += seq_len - 1
    return math.exp(nll / count)


def sparsity_of(model) -> float:
    linears = decoder_linears(model).values()
    return sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)


def calibration(tokenizer, n: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """n full windows of seq_len tokens of the shipped text, or all the full windows there are if fewer."""
    from sd2_core.config import CalibrationConfig
    from sd2_core.data.calibration import load_calibration

    ids, mask = load_calibration(tokenizer, CalibrationConfig(n_samples=n, seq_len=seq_len))
    # distinct full windows come first, then padded pieces, then repeats: count the leading full rows
    full = int(mask.all(dim=1).int().cumprod(0).sum())
    note = {"requested": f"{n}x{seq_len}", "used": f"{min(n, full)}x{seq_len}"}
    if full < n:
        note["note"] = f"the shipped calibration text has only {full} full windows of {seq_len} tokens; used them all"
        ids, mask = load_calibration(tokenizer, CalibrationConfig(n_samples=full, seq_len=seq_len))
    if not bool(mask.all()):
        raise SystemExit("calibration batch holds padding; both tools must see the same real tokens")
    return ids, note


def run_child(tool: str, python: Path, calib: Path, sparsity: str, model_dir: Path, work: Path, args) -> dict:
    tag = f"{tool}-{calib.stem}-{sparsity.replace(':', 'of')}"
    save, report = work / f"{tag}.pt", work / f"{tag}.json"
    command = [str(python), str(Path(__file__).resolve()), "--child", tool, "--calib", str(calib)]
    command += ["--sparsity", sparsity, "--model-dir", str(model_dir), "--save", str(save), "--report", str(report)]
    command += ["--threads", str(args.threads), "--out", "-"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    row = {"process_s": round(time.perf_counter() - start, 2)}
    if proc.returncode != 0:
        return {**row, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}"}
    got = json.loads(report.read_text())
    return {
        **row,
        "seconds": round(got["seconds"], 2),
        "peak_rss_mb": round(got["peak_rss_mb"], 1),
        "ru_maxrss_mb": round(got["ru_maxrss_mb"], 1),
        "version": got["version"],
        "weights": save,
    }


def pip_version(python: Path) -> tuple[str | None, str | None]:
    if not python.exists():
        return None, f"{python} does not exist; create it as this script's docstring says"
    code = "import llmcompressor, transformers; print(llmcompressor.__version__, transformers.__version__)"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr[-2000:]
    return proc.stdout.split()[-2] + " (transformers " + proc.stdout.split()[-1] + ")", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--calibrations", nargs="+", default=["16x256", "128x2048"], help="N x seq_len")
    parser.add_argument("--tools", nargs="+", default=["sd2", "llmcompressor"], choices=["sd2", "llmcompressor"])
    parser.add_argument("--llmc-python", type=Path, default=LLMC_PYTHON)
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pruning subprocess")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "prune_vs_llmcompressor")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--child", choices=["sd2", "llmcompressor"], help=argparse.SUPPRESS)
    for hidden in ("--calib", "--sparsity", "--model-dir", "--save", "--report"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    from sd2_core.models import builtin_dir, load_model, load_tokenizer

    model_dir = builtin_dir("smollm2-135m-instruct")
    tokenizer, dense = load_tokenizer(model_dir), load_model(model_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    lines = EVAL_TEXT.read_bytes().decode("utf-8").split("\r\n")
    eval_ids = torch.tensor(tokenizer("\n\n".join(lines).strip(), add_special_tokens=False)["input_ids"])
    llmc_version, llmc_error = pip_version(args.llmc_python) if "llmcompressor" in args.tools else (None, None)
    dense_ppl = perplexity(dense, eval_ids, args.eval_seq_len)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)

    settings, runs = [], []
    for setting in args.calibrations:
        n, seq_len = (int(x) for x in setting.lower().split("x"))
        ids, note = calibration(tokenizer, n, seq_len)
        calib = args.work / f"calib_{ids.shape[0]}x{seq_len}.pt"
        torch.save(ids, calib)
        settings.append(note)
        for sparsity in args.sparsities:
            for tool in args.tools:  # interleaved, so a busy spell of the machine hits both tools
                row = {"tool": tool, "calibration": note["used"], "sparsity": sparsity}
                if tool == "llmcompressor" and llmc_error:
                    runs.append({**row, "error": llmc_error})
                    continue
                python = args.llmc_python if tool == "llmcompressor" else Path(sys.executable)
                row.update(run_child(tool, python, calib, sparsity, model_dir, args.work, args))
                if "weights" in row:
                    model = copy.deepcopy(dense)
                    _, unexpected = model.load_state_dict(torch.load(row.pop("weights")), strict=False)
                    if unexpected:
                        raise SystemExit(f"{tool} saved unknown weights {unexpected[:3]}")
                    row["measured_sparsity"] = round(sparsity_of(model), 4)
                    row["perplexity"] = round(perplexity(model, eval_ids, args.eval_seq_len), 3)
                    del model
                runs.append(row)
                print(json.dumps(row)[:400], flush=True)

    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for r in runs:
        cells.setdefault((r["calibration"], r["sparsity"]), {})[r["tool"]] = r
    comparisons = []
    for (cal, sparsity), cell in cells.items():
        a, b = cell.get("sd2", {}), cell.get("llmcompressor", {})
        if "seconds" in a and "seconds" in b:
            ratio, ppl = a["seconds"] / b["seconds"], {"sd2": a["perplexity"], "llmc": b["perplexity"]}
            ok = ratio <= 0.7 and ppl["sd2"] <= ppl["llmc"]
            row = {"calibration": cal, "sparsity": sparsity, "sd2_over_llmc_time": round(ratio, 3)}
            comparisons.append({**row, "perplexity": ppl, "meets_target": ok})
    result = {
        "benchmark": "prune_vs_llmcompressor",
        "model": "smollm2-135m-instruct",
        "calibration_source": "sd2 shipped calibration text (load_calibration, seed 0, full windows only)",
        "calibrations": settings,
        "eval": {
            "text": f"bench/data/{EVAL_TEXT.name} (WikiText-2 raw test, first 4 articles)",
            "tokens": eval_ids.numel(),
            "seq_len": args.eval_seq_len,
            "windows": eval_ids.numel() // args.eval_seq_len,
            "dense_perplexity": round(dense_ppl, 3),
        },
        "llmcompressor": {"version": llmc_version, "python": str(args.llmc_python), "error": llmc_error},
        "settings": {"blocksize": 128, "dampening": 0.01, "lm_head": "not pruned", "threads": args.threads},
        "runs": runs,
        "comparisons": comparisons,
        "target": "sd2 time <= 0.7 x llm-compressor's at perplexity no worse",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m": os.getloadavg()[0],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("calibrations", "comparisons", "llmcompressor")}, indent=2))


if __name__ == "__main__":
    main()
