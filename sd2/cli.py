"""The `sd2` command line: every stage alone (plain sd2_core calls) and the whole cell (the Prefect flow).

Logs and progress go to stderr; with --json the one result object is the only thing on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd2_core.errors import UserError

log = logging.getLogger("sd2")


def _progress(done: int, total: int, message: str = "") -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message[:60]:<60}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


def _base_config(args: argparse.Namespace):
    """The profile's or the config file's cell, with --device/--dtype; its devices checked before any work."""
    from sd2_core.config import CellConfig, profile, with_placement
    from sd2_core.placement import check_placements

    if getattr(args, "config", None):
        try:
            cell = CellConfig.model_validate_json(Path(args.config).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {args.config!r} does not exist") from None
    else:
        cell = profile(args.profile)
    cell = with_placement(cell, args.device, args.dtype)
    check_placements(cell)
    return cell


def _store(args: argparse.Namespace, base) -> Any:
    from sd2_core.store import Store

    return Store(args.store or base.store)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named command-line options, by the config field they set (same name)."""
    return {name: getattr(args, name) for name in names}


def _update(model, **changes: Any):
    """A validated copy of a pydantic config with the given fields changed (None = keep)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return type(model).model_validate({**model.model_dump(), **changes}) if changes else model


def cmd_models_materialize(args: argparse.Namespace) -> dict[str, Any]:

    from sd2_core.models import copy_model_files, model_source

    src = model_source(args.ref)
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; pass an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    return {"ref": args.ref, "out": str(out.resolve()), "files": copy_model_files(src, out)}


def _model(store, ref: str):
    """A model reference as an artifact of the store (materialized when it is not one already)."""
    from sd2_core.artifacts import find_artifact, produce
    from sd2_core.models import model_recipe

    return find_artifact(store, ref) or produce(store, model_recipe(store, ref))


def cmd_distill(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.artifacts import produce
    from sd2_core.distill import distill_recipe

    base = _base_config(args)
    store = _store(args, base)
    source = next((s for s in base.sources if s.kind == args.kind), None)
    if source is None:
        raise UserError(f"--kind {args.kind!r} is not a source of profile {args.profile}")
    source = _update(source, uri=args.source, limit=args.limit)
    cfg = _update(
        base.distill, **_given(args, "max_new_tokens", "temperature", "top_p", "seed", "batch_size", "backend")
    )
    target = _model(store, args.target or base.target)
    return produce(store, distill_recipe(store, target, source, cfg), _progress).to_dict()


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.artifacts import produce
    from sd2_core.pruning.oneshot import prune_recipe

    base = _base_config(args)
    store = _store(args, base)
    calibration = _update(base.prune.calibration, uri=args.calibration, n_samples=args.n_samples, seq_len=args.seq_len)
    cfg = _update(base.prune, sparsity=args.sparsity, calibration=calibration.model_dump())
    draft = _model(store, args.draft or base.draft)
    return produce(store, prune_recipe(store, draft, cfg), _progress).to_dict()


def _parse_mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise UserError(f"--mix {text!r}: expected kind=weight pairs like general=0.75,translation=0.125") from None
    return mix


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.artifacts import produce, require_artifact
    from sd2_core.finetune import finetune_recipe

    base = _base_config(args)
    store = _store(args, base)
    given = _given(args, "steps", "batch_size", "max_seq_len", "seed")
    cfg = _update(base.finetune, **given, learning_rate=args.lr, mix=_parse_mix(args.mix))
    draft = _model(store, args.draft)
    distilled = [require_artifact(store, ref, "distill", "--distilled") for ref in args.distilled]
    return produce(store, finetune_recipe(store, draft, distilled, cfg), _progress).to_dict()


def cmd_mal(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.artifacts import produce
    from sd2_core.mal import mal_recipe, reference_recipe

    base = _base_config(args)
    store = _store(args, base)
    cfg = _update(
        base.mal, k=args.k, max_new_tokens=args.max_new_tokens, prompts=args.prompts, batch_size=args.batch_size
    )
    if args.per_category is not None or args.prompts:
        # a user's own prompts file is measured whole unless --per-category says otherwise
        cfg = cfg.model_copy(update={"per_category": args.per_category})
        cfg = type(cfg).model_validate(cfg.model_dump())
    target = _model(store, args.target or base.target)
    draft = _model(store, args.draft or base.draft)
    ref = produce(store, reference_recipe(store, target, cfg), _progress)
    result = produce(store, mal_recipe(store, target, draft, ref, cfg), _progress)
    return {
        **result.summary,
        "artifacts": {"mal": result.uri, "reference": ref.uri, "target": target.uri, "draft": draft.uri},
    }


def cmd_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.accuracy import accuracy_recipe
    from sd2_core.artifacts import produce

    base = _base_config(args)
    store = _store(args, base)
    tasks = [t for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
    cfg = _update(base.accuracy, tasks=tasks, source=args.source, batch_size=args.batch_size)
    if args.limit is not None or args.all_items:
        cfg = type(cfg).model_validate({**cfg.model_dump(), "limit": None if args.all_items else args.limit})
    model = _model(store, args.model)
    result = produce(store, accuracy_recipe(store, model, cfg), _progress)
    return {**result.summary, "artifacts": {"accuracy": result.uri, "model": model.uri}}


def cmd_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.artifacts import produce
    from sd2_core.perplexity import perplexity_recipe

    base = _base_config(args)
    store = _store(args, base)
    cfg = _update(base.perplexity, **_given(args, "context_len", "stride", "max_tokens"), uri=args.text)
    model = _model(store, args.model)
    result = produce(store, perplexity_recipe(store, model, cfg), _progress)
    return {**result.summary, "artifacts": {"perplexity": result.uri, "model": model.uri}}


def cmd_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.artifacts import produce
    from sd2_core.serve_bench import check_pair, serve_bench_recipe, served_target_recipe
    from sd2_core.vllm_server import require_vllm

    require_vllm()
    base = _base_config(args)
    store = _store(args, base)
    cfg = _update(base.mal, k=args.k, max_new_tokens=args.max_new_tokens, per_category=args.per_category)
    target = _model(store, args.target or base.target)
    draft = _model(store, args.draft or base.draft)
    check_pair(store.local_dir(target), store.local_dir(draft), cfg.k)  # before any server starts
    alone = produce(store, served_target_recipe(store, target, cfg), _progress)
    served = produce(store, serve_bench_recipe(store, target, draft, alone, cfg), _progress)
    return {**served.summary, "artifacts": {"serve": served.uri, "serve_target": alone.uri}}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.config import CellConfig
    from sd2_core.export import export_drafter, serve_line
    from sd2_core.store import Store

    store = Store(args.store or CellConfig().store)
    draft = _model(store, args.draft)
    result = export_drafter(store.local_dir(draft), Path(args.out))
    target = args.target or "TARGET"
    return {**result, "draft": draft.uri, "vllm_serve": serve_line(target, Path(result["out"]), args.k)}


def cmd_cell(args: argparse.Namespace) -> dict[str, Any]:
    from flows.cell import cell_flow
    from sd2.prefect_server import prefect_api
    from sd2_core.config import variant_prune

    base = _base_config(args)
    if args.variant and args.sparsity:
        raise UserError("give --variant or --sparsity, not both (--sparsity S is the variant sgpt-S)")
    prune = variant_prune(args.variant, base.prune) if args.variant else _update(base.prune, sparsity=args.sparsity)
    cfg = _update(base, target=args.target, draft=args.draft, store=args.store, prune=prune.model_dump())
    with prefect_api():
        start = time.time()
        summary = cell_flow(config=cfg)
    summary["wall_seconds"] = round(time.time() - start, 2)
    return summary


def _parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """--set finetune.steps=100 --set mal.per_category=5 → {"finetune": {"steps": 100}, "mal": {...}}."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        path, sep, raw = item.partition("=")
        parts = [p for p in path.strip().split(".") if p]
        if not sep or len(parts) < 2:
            raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. finetune.steps=100")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return overrides


def _grid(args: argparse.Namespace):
    """The sweep's grid: an earlier run's, a config file's or the default, with the command line's changes, validated
    once (so that `--profile smoke` alone also means the smoke profile's models)."""
    from sd2_core.config import GridConfig, merge_settings, placement_overrides

    raw: dict[str, Any] = {}
    if args.rerun_failed:
        from flows.sweep import grid_of_run

        raw = grid_of_run(args.rerun_failed).model_dump(mode="json")
        log.info("rerunning sweep %r of run %s: finished cells are cache hits", raw["name"], args.rerun_failed)
    elif args.config:
        try:
            raw = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {args.config!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"config file {args.config!r} is not JSON: {exc}") from None
    changes = {
        "name": args.name,
        "profile": args.profile,
        "targets": args.targets,
        "drafts": args.drafts,
        "variants": args.variants,
        "store": args.store,
        "concurrency": args.concurrency,
    }
    raw = {**raw, **{k: v for k, v in changes.items() if v is not None}}
    overrides = merge_settings(placement_overrides(args.device, args.dtype), _parse_sets(args.set))
    if overrides:
        raw["overrides"] = merge_settings(raw.get("overrides", {}), overrides)
    return GridConfig.model_validate(raw)


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from sd2.prefect_server import prefect_api
    from sd2_core.placement import check_placements

    # --rerun-failed reads the earlier run's grid from the API: one server for that and the sweep (the inner
    # prefect_api() then reuses it); otherwise a bad grid is refused before any server starts
    with prefect_api() if args.rerun_failed else contextlib.nullcontext():
        grid = _grid(args)
        for cell in grid.cells():
            check_placements(cell)
        from flows.sweep import sweep_flow

        with prefect_api():
            state = sweep_flow(grid=grid, return_state=True)
            result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    result["state"] = state.type.value
    result["message"] = state.message or ""
    args.exit_code = 1 if result["failed"] else 0
    return result


def cmd_artifacts_ls(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.store import Store
    from sd2_core.store_listing import human_size, list_artifacts

    store = Store(args.store)
    rows = list_artifacts(store, args.stage)
    if not args.json:
        for r in rows:
            print(f"{r['stage']:<11} {r['key']}  {human_size(r['bytes']):>9}  {r['created']}  {r['summary']}")
        args.quiet = True
    return {"store": store.uri, "artifacts": rows}


def cmd_artifacts_show(args: argparse.Namespace) -> dict[str, Any]:
    from sd2_core.store import Store
    from sd2_core.store_listing import find_manifest

    store = Store(args.store)
    manifest = find_manifest(store, args.key)
    return {**manifest, "uri": store.uri_of(manifest["stage"], manifest["key"])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd2", description="Self-distilled sparse drafters (SD²)")
    sub = parser.add_subparsers(dest="command", required=True)

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("-v", "--verbose", action="store_true", help="sd2 at DEBUG, other libraries at INFO")

    def placement(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", help="every stage's device: auto, cpu, cuda or cuda:N (default: the profile's)")
        p.add_argument(
            "--dtype",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="every stage's precision (default: the profile's; cpu and smoke: float32, paper: bfloat16)",
        )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"], help="default settings")
        p.add_argument("--config", help="a CellConfig JSON file instead of a profile")
        p.add_argument("--store", help="artifact store: local folder or s3://bucket/prefix (default ./sd2-store)")
        placement(p)
        output(p)

    p = sub.add_parser("distill", help="the target rewrites one source's answers (self-data distillation)")
    common(p)
    p.add_argument("--target", help="target model: built-in name, local HF folder or hub id")
    p.add_argument("--kind", required=True, choices=["general", "translation", "math"])
    p.add_argument("--source", help="'embedded', a local .jsonl/.json/.parquet, or hf:<dataset id>")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--backend", choices=["auto", "transformers", "vllm"], help="default auto: vLLM where installed")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("prune", help="SparseGPT one-shot pruning of a draft")
    common(p)
    p.add_argument("--draft", help="draft model: built-in name, local HF folder or hub id")
    p.add_argument("--sparsity", help="fraction in (0,1) or N:M, e.g. 0.5 or 2:4")
    p.add_argument("--calibration", help="'embedded', a local .txt/.jsonl, or hf:<dataset id>")
    p.add_argument("--n-samples", type=int)
    p.add_argument("--seq-len", type=int)
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("finetune", help="sparse fine-tuning on distilled data, masks fixed")
    common(p)
    p.add_argument("--draft", required=True, help="pruned draft: prune/<key>, its folder, or any model reference")
    p.add_argument("--distilled", nargs="+", required=True, help="distill artifacts: distill/<key> ...")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate (default: by draft size and sparsity)")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--mix", help="source weights, e.g. general=0.75,translation=0.125,math=0.125")
    p.add_argument("--seed", type=int)
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("mal", help="Mean Accepted Length of a draft against a target")
    common(p)
    p.add_argument("--target", help="target model reference")
    p.add_argument("--draft", help="draft model reference (e.g. finetune/<key>)")
    p.add_argument("--k", type=int, help="draft tokens per verification step (default 5)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--prompts", help="JSONL with {prompt} or {turns} rows (default: SpecBench)")
    p.add_argument("--per-category", type=int, help="first N prompts of each category")
    p.add_argument("--batch-size", type=int, help="sequences decoded together, each with its own acceptance (1)")
    p.set_defaults(fn=cmd_mal)

    p = sub.add_parser("accuracy", help="OpenLLM-v1 accuracy of a model through lm-eval (offline on shipped subsets)")
    common(p)
    p.add_argument("model", help="model reference: built-in name, prune/<key>, finetune/<key>, a folder or a hub id")
    p.add_argument(
        "--tasks",
        help="comma-separated: arc_challenge, hellaswag, truthfulqa_mc2, winogrande, gsm8k, mmlu (default: profile)",
    )
    p.add_argument("--limit", type=int, help="first N items per task (MMLU: per subject); default: the profile's")
    p.add_argument("--all-items", action="store_true", help="score every item (no limit)")
    p.add_argument("--source", choices=["embedded", "hub"], help="shipped subsets (default) or lm-eval's hub data")
    p.add_argument("--batch-size", type=int)
    p.set_defaults(fn=cmd_accuracy)

    p = sub.add_parser("perplexity", help="WikiText-2 perplexity of a model (the shipped raw test split)")
    common(p)
    p.add_argument("model", help="model reference: built-in name, prune/<key>, finetune/<key>, a folder or a hub id")
    p.add_argument("--text", help="'embedded' (WikiText-2 test) or a local text file")
    p.add_argument("--context-len", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--max-tokens", type=int)
    p.set_defaults(fn=cmd_perplexity)

    p = sub.add_parser(
        "serve-bench", help="vLLM serving the target alone, then with the draft as its speculative model (needs vLLM)"
    )
    common(p)
    p.add_argument("--target", help="target model reference")
    p.add_argument("--draft", help="draft model reference (e.g. finetune/<key>)")
    p.add_argument("--k", type=int, help="draft tokens per step, 1..16 (default 5)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--per-category", type=int, help="first N SpecBench prompts of each category")
    p.set_defaults(fn=cmd_serve_bench)

    p = sub.add_parser("export", help="write a draft as a folder vLLM loads as its speculative model")
    p.add_argument("draft", help="draft reference: finetune/<key>, prune/<key>, a folder or any model reference")
    p.add_argument("--out", required=True, help="new or empty folder")
    p.add_argument("--target", help="the target to show in the printed `vllm serve` line")
    p.add_argument("--k", type=int, default=5, help="draft tokens per step in the printed line")
    p.add_argument("--store", help="artifact store: local folder or s3://bucket/prefix (default ./sd2-store)")
    output(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("cell", help="one SD² cell end to end as a Prefect flow")
    common(p)
    p.add_argument("--target")
    p.add_argument("--draft")
    p.add_argument("--sparsity", help="SparseGPT sparsity: fraction in (0,1) or N:M")
    p.add_argument("--variant", help="dense, layer-50, sgpt-50, sgpt-66, sgpt-75, sgpt-2:4, ...")
    p.set_defaults(fn=cmd_cell)

    p = sub.add_parser("sweep", help="a grid of cells (targets × drafts × variants) as one Prefect flow")
    p.add_argument("--profile", choices=["smoke", "cpu", "paper"], help="stage sizes (default: cpu)")
    p.add_argument("--config", help="a GridConfig JSON file")
    p.add_argument("--name", help="label of the sweep")
    p.add_argument("--targets", nargs="+", help="target model references")
    p.add_argument("--drafts", nargs="+", help="draft model references")
    p.add_argument("--variants", nargs="+", help="dense, layer-50, sgpt-50, sgpt-66, sgpt-75, sgpt-2:4, ...")
    p.add_argument("--store", help="artifact store: local folder or s3://bucket/prefix")
    p.add_argument("--concurrency", type=int, help="cells at the same time (default 1)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="stage override, repeatable")
    p.add_argument("--rerun-failed", metavar="RUN", help="flow run name or id of an earlier sweep: run its grid again")
    placement(p)
    output(p)
    p.set_defaults(fn=cmd_sweep)

    artifacts = sub.add_parser("artifacts", help="inspect the artifact store")
    asub = artifacts.add_subparsers(dest="artifacts_command", required=True)
    for name, fn, helptext in (
        ("ls", cmd_artifacts_ls, "list the complete artifacts"),
        ("show", cmd_artifacts_show, "print one artifact's manifest"),
    ):
        p = asub.add_parser(name, help=helptext)
        if name == "ls":
            p.add_argument("--stage", help="only this stage (model, distill, prune, layerprune, finetune, mal, ...)")
        else:
            p.add_argument("key", help="stage/key, a key (or unique prefix) or the artifact's URI")
        p.add_argument("--store", default="./sd2-store", help="local folder or s3://bucket/prefix")
        output(p)
        p.set_defaults(fn=fn)

    models = sub.add_parser("models", help="model references")
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("materialize", help="write any model reference as a plain Hugging Face folder")
    p.add_argument("ref")
    p.add_argument("--out", required=True)
    output(p)
    p.set_defaults(fn=cmd_models_materialize)
    return parser


class Terminated(SystemExit):
    """SIGTERM arrived: raised in the main thread so `finally` blocks run and started servers stop in order."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def on_sigterm(signum: int, frame: object) -> None:
        raise Terminated(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


OWN_LOGGERS = ("sd2", "sd2_core", "flows", "tasks")


def configure_logging(verbose: bool) -> None:
    """sd2's own progress at INFO (DEBUG with -v); other libraries' loggers (httpx's request lines, ...) only at
    WARNING unless -v, so a Prefect server's traffic does not bury sd2's lines. Prefect's run logs keep their
    own handler and level (PREFECT_LOGGING_LEVEL)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from pydantic import ValidationError

    from sd2_core.processes import stop_signal_deadline

    try:
        with stop_signal_deadline() as stop, _sigterm_raises():
            result = args.fn(args)
    except (UserError, ValidationError) as exc:
        sys.stderr.write(f"sd2: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("sd2: interrupted\n")
        return 130
    except Terminated as exc:
        sys.stderr.write("sd2: terminated\n")
        return exc.code
    if stop.received is not None:  # a library's handler took the signal and carried on: it is still a stop
        sys.stderr.write(f"sd2: {'interrupted' if stop.received == signal.SIGINT else 'terminated'}\n")
        return 128 + stop.received
    if not getattr(args, "quiet", False):
        _emit(args, result)
    return getattr(args, "exit_code", 0)


if __name__ == "__main__":
    raise SystemExit(main())
