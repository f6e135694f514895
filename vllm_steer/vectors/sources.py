"""Source strings: where a vector file or an SAE decoder lives.

A source is a local path or a Hugging Face Hub file, optionally followed by options::

    steering_vectors.pt
    ~/vectors/happy.gguf#name=happy
    hf://spaces/huggingface/eiffel-tower-llama-demo/steering_vectors.pt
    hf://andyrdt/saes-llama-3.1-8b-instruct/resid_post_layer_11/trainer_1/ae.pt
    hf://datasets/OWNER/REPO@v1.0/vectors.safetensors
    /data/saes/blocks.11.hook_resid_post#layer=11

Hub form: ``hf://[spaces/|datasets/|models/]OWNER/REPO[@REVISION]/PATH/IN/REPO`` (no
prefix: a model repo; the revision URL-quoted when it holds ``/``). It downloads through
``huggingface_hub.hf_hub_download`` into the usual cache, with the token huggingface-hub
finds itself (``HF_TOKEN``, the stored login). A local path never touches the network.

Options go after the last ``#`` as ``key=value`` pairs joined by ``&``; a ``#`` not followed
by that shape is part of the path. Which keys apply depends on the use: ``name`` for vector
files (files.py), ``layer`` for SAE decoders (sae.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import huggingface_hub
from huggingface_hub import errors as hub_errors

HUB_SCHEME = "hf://"
_OPTIONS = re.compile(r"[a-z_]+=[^&#=]*(?:&[a-z_]+=[^&#=]*)*")
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str  # path inside the repo, "/"-separated
    repo_type: str = "model"
    revision: str | None = None

    def download(self) -> Path:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id=self.repo_id, filename=self.filename, repo_type=self.repo_type, revision=self.revision
            )
        )

    def download_if_present(self) -> Path | None:
        """Like download(), but None when the repo has no such file."""
        try:
            return self.download()
        except hub_errors.EntryNotFoundError as exc:
            if isinstance(exc, hub_errors.LocalEntryNotFoundError):  # offline and not cached: not an answer
                raise
            return None

    def child(self, name: str) -> HubFile:
        """A file next to this one (``name`` relative to this file's folder) or, for a folder, in it."""
        return HubFile(self.repo_id, f"{self.filename}/{name}", self.repo_type, self.revision)

    def sibling(self, name: str) -> HubFile:
        parent = str(PurePosixPath(self.filename).parent)
        filename = name if parent == "." else f"{parent}/{name}"
        return HubFile(self.repo_id, filename, self.repo_type, self.revision)


@dataclass(frozen=True)
class Source:
    text: str  # as given; what the registry records as a vector's source
    location: str  # the path or hf:// address, without options
    options: dict[str, str] = field(default_factory=dict)
    hub: HubFile | None = None

    @property
    def name(self) -> str:
        """The last path component (a file name or a folder name)."""
        return PurePosixPath(self.hub.filename).name if self.hub else Path(self.location).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix.lower()

    def local_path(self) -> Path:
        """The file on this machine, downloading it first for a hub source."""
        return self.hub.download() if self.hub else Path(self.location).expanduser()


def parse_source(text: str | Path, allowed_options: tuple[str, ...] | None = ()) -> Source:
    """Split a source string into location, options and hub address (``allowed_options``
    None: any option keys)."""
    text = str(text)
    location, options = text, {}
    head, sep, tail = text.rpartition("#")
    if sep and _OPTIONS.fullmatch(tail):
        location = head
        options = dict(pair.split("=", 1) for pair in tail.split("&"))
        unknown = [] if allowed_options is None else sorted(set(options) - set(allowed_options))
        if unknown:
            allowed = ", ".join(allowed_options) if allowed_options else "none"
            raise ValueError(f"{text}: unknown option {', '.join(unknown)}; options here: {allowed}")
    if not location:
        raise ValueError(f"{text!r}: no path given")
    hub = parse_hub(location) if location.startswith(HUB_SCHEME) else None
    return Source(text, location, options, hub)


def absolute_source(text: str | Path) -> str:
    """The same source from any working directory: a local path made absolute (options kept),
    an ``hf://`` address unchanged. (``Path(text).resolve()`` would turn ``hf://a/b/c`` into
    ``$PWD/hf:/a/b/c``.)"""
    source = parse_source(text, None)
    if source.hub is not None:
        return source.text
    return str(Path(source.location).expanduser().resolve()) + source.text[len(source.location):]


def parse_hub(address: str) -> HubFile:
    """``hf://[spaces/|datasets/|models/]OWNER/REPO[@REVISION]/PATH`` -> a hub file."""
    usage = "expected hf://[spaces/|datasets/]OWNER/REPO[@REVISION]/PATH/IN/REPO"
    parts = address[len(HUB_SCHEME):].split("/")
    repo_type = "model"
    if parts[0] in _REPO_TYPES:
        repo_type = _REPO_TYPES[parts.pop(0)]
    if len(parts) < 3 or any(not part for part in parts):
        raise ValueError(f"{address}: {usage}")
    owner, repo, path = parts[0], parts[1], parts[2:]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        revision = unquote(revision)
        if not repo or not revision:
            raise ValueError(f"{address}: {usage}")
    return HubFile(f"{owner}/{repo}", "/".join(path), repo_type, revision)


def int_option(source: Source, key: str) -> int | None:
    value = source.options.get(key)
    if value is None:
        return None
    if not value.isdigit():
        raise ValueError(f"{source.text}: {key} must be a non-negative integer, got {value!r}")
    return int(value)
