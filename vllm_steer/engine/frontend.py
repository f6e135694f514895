"""Front-end side: resolve, check and salt every request's steering, once, before it is queued.

Every entry path (the offline ``LLM``, the OpenAI server, raw ``extra_args``, pre-built
``EngineCoreRequest``s) hands each request once to ``InputProcessor.assign_request_id``
before queueing it; the plugin wraps that call (``seam.py``) with ``prepare_request``.
For a request with ``extra_args["steering"]`` it
1. resolves the spec against the model and the front end's registry (a bad spec raises a
   400-class ``VLLMValidationError`` naming the field, before the engine sees it). The
   server's middleware has resolved it already, to answer errors and send the fingerprint
   header; it hands the result on *sealed* (HMAC with this process's key), so it is
   decoded here, not resolved again;
2. replaces it with the resolved wire form (vectors by digest), which workers only decode:
   they apply exactly what was validated, even if a name is re-registered meanwhile. A
   vector the workers may not hold (a name another replica registered in the shared
   registry directory, not yet pushed to this engine) travels inline with the request,
   so no request is accepted that its workers cannot steer (``WorkerContents``);
3. folds the spec's cache namespace into ``cache_salt``: vLLM's prefix-cache hashes cover
   the salt but not ``extra_args``, so without this a steered request's KV blocks would be
   reused by unsteered or differently steered requests with the same prompt.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np

from vllm_steer.core.plan import ResolvedSteering
from vllm_steer.core.registry import Vector, VectorRegistry
from vllm_steer.core.resolve import check_layer, resolve
from vllm_steer.core.spec import DIGEST_PREFIX, CaptureSpec, SteeringError, parse_capture
from vllm_steer.engine import rpc, seam
from vllm_steer.engine.config import SteeringConfig
from vllm_steer.engine.families import FAMILIES, is_steered
from vllm_steer.engine.seam import VLLMValidationError
from vllm_steer.vectors.store import RegistryStore

SALT_PREFIX = "vllm-steer:"
SEAL_PREFIX = "vllm-steer-sealed:"
# Sealed specs kept resolved, by count and by the length of their texts (inline vectors
# make a spec large); an older one is checked and decoded again.
SEALED_KEPT = 256
SEALED_KEPT_CHARS = 64 * 2**20
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}")
logger = logging.getLogger("vllm_steer")


class SteeringRequestError(VLLMValidationError, SteeringError):
    """A bad spec at the front end: vLLM maps it to HTTP 400; Python callers may catch
    it as ``SteeringError`` or ``ValueError``."""

    def __init__(self, error: SteeringError):
        Exception.__init__(self, str(error))
        self.field, self.reason = error.field, error.reason
        self.parameter, self.value = error.field, None

    def __str__(self) -> str:
        return Exception.__str__(self)


def steering_salt(namespace: str, user_salt: str | None) -> str:
    """The cache salt of a steered request: its steering's namespace, plus any salt of the user's."""
    if user_salt is None:
        return SALT_PREFIX + namespace
    return SALT_PREFIX + hashlib.sha256(f"{namespace}\0{user_salt}".encode()).hexdigest()[:32]


class WorkerContents:
    """What this front end knows its workers hold: the names loaded at start and those it
    pushed, each with its entry digest and content digests. Content some such name points
    at is live on the workers (not a retired copy their LRU may drop)."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._refs: Counter[str] = Counter()

    def set(self, name: str, entry_digest: str, contents: tuple[str, ...]) -> None:
        self.drop(name)
        self._names[name] = (entry_digest, contents)
        self._refs.update(contents)

    def drop(self, name: str) -> None:
        for digest in self._names.pop(name, (None, ()))[1]:
            self._refs[digest] -= 1
            if not self._refs[digest]:
                del self._refs[digest]

    def holds(self, digest: str) -> bool:
        return digest in self._refs

    def behind(self, registry: VectorRegistry) -> tuple[list[str], list[str]]:
        """The names whose current entry the workers lack, and those they hold but the
        registry no longer has: what to push and what to remove to bring them up to date."""
        stale = [name for name in registry.names() if self._names.get(name, (None,))[0] != registry.entry_digest(name)]
        gone = [name for name in self._names if name not in registry]
        return stale, gone


class SteeringFrontend:
    """The front end's view of the served model: its shape, and a registry mirroring the
    workers' (plus, with ``registry_dir``, the run-time changes every front end shares)."""

    def __init__(self, hf_config: Any, dtype: str = "float32", pipeline_stages: int = 1):
        self.settings = SteeringConfig.from_hf_config(hf_config)
        self.shape = self.settings.model_shape(hf_config, dtype, seam.device_memory(), pipeline_stages)
        self.registry = self.settings.load_registry(hf_config)
        self.bos_token_id = getattr(hf_config, "bos_token_id", None)  # for engines without a tokenizer
        self.workers = WorkerContents()  # workers load the same files at start
        for name in self.registry.names():
            self.mark_pushed(name)
        self.store = RegistryStore(self.settings.registry_dir) if self.settings.registry_dir else None
        self._seal_key = secrets.token_bytes(32)
        # The latest sealed specs, by their text: the hook takes its own seal's result as it
        # is, without checking the MAC or decoding the wire (a batch hands on hundreds).
        self._sealed: dict[str, ResolvedSteering] = {}
        self._sealed_chars = 0
        self._sealed_lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        if self.store is not None:
            self.store.refresh(self.registry)

    def resolve(self, spec: Any) -> ResolvedSteering | None:
        """Validate a user's spec (dict, JSON text or SteeringSpec); None when it changes nothing.
        Content the workers may not hold is carried inline."""
        self.refresh()
        resolved = resolve(spec, self.shape, self.registry)
        if resolved is None:
            return None
        unheld = [d for d in resolved.digests if d not in resolved.inline and not self.workers.holds(d)]
        return resolved.carrying({d: self.registry.array(d) for d in unheld}) if unheld else resolved

    def worker_updates(self) -> list[tuple[rpc.WorkerCall, Callable[[], None]]]:
        """The calls that bring the workers up to this front end's registry (the shared
        directory's changes: other replicas' registrations and deletions), each with what to
        record once the workers have run it."""
        self.refresh()
        stale, gone = self.workers.behind(self.registry)
        updates = []
        for name in stale:
            updates.append((rpc.add_vector(name, self.registry.vector(name), self.registry.info(name).source), self._pushed(name)))
        for name in gone:
            self.workers.drop(name)  # now: nothing resolves the name, and its content may be another's
            updates.append((rpc.remove_vector(name), lambda: None))
        return updates

    def mark_pushed(self, name: str) -> None:
        """The workers now hold ``name`` as this front end's registry has it."""
        self._pushed(name)()

    def _pushed(self, name: str) -> Callable[[], None]:
        """What records that the workers hold ``name`` as the registry has it now (call it once they do)."""
        return partial(self.workers.set, name, self.registry.entry_digest(name), self.registry.content_digests(name))

    # ---- the middleware's hand-off to prepare_request (same process) ---------------------
    def seal(self, resolved: ResolvedSteering) -> str:
        wire = resolved.wire
        sealed = f"{SEAL_PREFIX}{self._mac(wire)}:{wire}"
        with self._sealed_lock:
            if sealed not in self._sealed:
                self._sealed[sealed] = resolved
                self._sealed_chars += len(sealed)
            while len(self._sealed) > SEALED_KEPT or self._sealed_chars > SEALED_KEPT_CHARS:
                oldest = next(iter(self._sealed))
                del self._sealed[oldest]
                self._sealed_chars -= len(oldest)
        return sealed

    def accept(self, value: Any) -> ResolvedSteering | None:
        """A sealed spec is this front end's own result (kept, or checked and decoded);
        anything else is a user's spec and is resolved."""
        if isinstance(value, str) and value.startswith(SEAL_PREFIX):
            with self._sealed_lock:
                kept = self._sealed.get(value)
            if kept is not None:
                return kept
            mac, _, wire = value.removeprefix(SEAL_PREFIX).partition(":")
            if not hmac.compare_digest(mac, self._mac(wire)):
                raise SteeringError("a sealed spec must come from this server's own front end; send the spec itself")
            return ResolvedSteering.from_wire(wire)
        return self.resolve(value)

    def _mac(self, wire: str) -> str:
        return hmac.new(self._seal_key, wire.encode(), hashlib.sha256).hexdigest()

    def check_capture(self, value: Any) -> CaptureSpec:
        capture = parse_capture(value)
        if not self.settings.capture:
            raise SteeringError("capture is off on this server; start it with capture on (hf_overrides steering.capture)", "steering_capture")
        for position, layer in enumerate(capture.layers):
            check_layer(layer, self.shape, f"steering_capture.layers[{position}]")
        return capture

    # ---- registry changes: check, then (after the workers have it) commit ---------------
    def registration(self, name: str, vector: Any, *, replace: bool, source: str) -> rpc.Registration:
        """Check a registry change (a SteeringError names what is wrong); the caller sends its
        ``worker_call`` to the workers and then commits it."""
        return rpc.Registration(self, name, self.check_vector(name, vector, replace), replace, source)

    def check_vector(self, name: str, vector: Any, replace: bool) -> Vector:
        """A vector (or ``{layer: vector}``) fit for this model as float32, or a SteeringError."""
        self.refresh()
        if not NAME_PATTERN.fullmatch(name or "") or name.startswith(DIGEST_PREFIX):
            raise SteeringError("names are 1-128 characters: letters, digits and _ . : / @ + - (not 'sha256:...')", "name")
        if name in self.registry and not replace:
            raise SteeringError(f"vector {name!r} already exists; send \"replace\": true to replace it", "name")
        if name not in self.registry and len(self.registry) >= self.settings.max_registry_vectors:
            raise SteeringError(
                f"the registry holds its limit of {self.settings.max_registry_vectors} vectors; delete one first "
                "(hf_overrides steering.max_registry_vectors)",
                "name",
            )
        arrays = vector if isinstance(vector, Mapping) else {None: vector}
        checked = {}
        for layer, array in arrays.items():
            array = np.asarray(array, dtype=np.float32).reshape(-1)
            where = "vector" if layer is None else f"layers[{layer}]"
            if array.size != self.shape.hidden_size:
                raise SteeringError(f"has {array.size} values; this model's hidden size is {self.shape.hidden_size}", where)
            if not np.isfinite(array).all():
                raise SteeringError("contains NaN or inf", where)
            if layer is not None:
                check_layer(int(layer), self.shape, where)
            checked[layer if layer is None else int(layer)] = array
        return checked[None] if None in checked else checked

    def commit_vector(self, name: str, vector: Vector, *, source: str, replace: bool) -> str:
        digest = self.registry.add(name, vector, replace=True, source=source)
        self.mark_pushed(name)  # the Registration pushed it first
        if self.store is not None:
            self.store.put(name, vector, digest=digest, source=source, replace=replace)
        logger.info("steering registry: %s %r = %s (%s)", "replaced" if replace else "added", name, digest, source)
        return digest

    def remove_vector(self, name: str) -> rpc.WorkerCall:
        """Delete a name here (KeyError when unknown); send the returned call to the workers."""
        self.refresh()
        if name not in self.registry:
            raise KeyError(name)
        self.registry.remove(name)
        self.workers.drop(name)
        if self.store is not None:
            self.store.delete(name)
        logger.info("steering registry: deleted %r", name)
        return rpc.remove_vector(name)


_LOCK = threading.Lock()


def frontend_of(input_processor: Any) -> SteeringFrontend | None:
    """The SteeringFrontend of an engine's InputProcessor; None if the model is not steerable."""
    frontend = seam.attached(input_processor)
    if frontend is None:
        with _LOCK:
            frontend = seam.attached(input_processor)
            if frontend is None:
                hf_config = seam.served_hf_config(input_processor)
                steerable = is_steered(getattr(hf_config, "architectures", None))
                frontend = SteeringFrontend(
                    hf_config, seam.served_dtype(input_processor), seam.pipeline_stages(input_processor)
                ) if steerable else False
                seam.attach(input_processor, frontend)
    return frontend or None


def on_new_request(input_processor: Any, request: Any) -> None:
    """The front-end hook (``seam.wrap_assign_request_id``)."""
    prepare_request(frontend_of(input_processor), request)


def prepare_request(frontend: SteeringFrontend | None, request: Any) -> None:
    """Resolve and salt one EngineCoreRequest in place (see the module docstring)."""
    salt = seam.request_cache_salt(request)
    if (salt or "").startswith(SALT_PREFIX):
        # Otherwise an unsteered request could write KV blocks into a steered namespace.
        raise SteeringRequestError(SteeringError(f"may not start with {SALT_PREFIX!r} (reserved for steering)", "cache_salt"))
    extra = seam.request_extra_args(request)
    if not extra or ("steering" not in extra and "steering_capture" not in extra):
        return
    if frontend is None:
        raise SteeringRequestError(
            SteeringError(
                "needs a steered model: start the engine with vllm-steer serve or vllm_steer.SteeredLLM, or give "
                'vLLM hf_overrides={"architectures": ["Steered<its architecture>"]}, e.g. "SteeredLlamaForCausalLM" '
                f"(families: {', '.join(family.architecture for family in FAMILIES.values())})"
            )
        )
    extra = dict(extra)
    try:
        if "steering_capture" in extra:
            extra["steering_capture"] = frontend.check_capture(extra["steering_capture"]).model_dump_json()
        resolved = frontend.accept(extra["steering"]) if "steering" in extra else None
    except SteeringError as exc:
        raise SteeringRequestError(exc) from None
    # Every captured token must be computed, and a condition reads every prompt token: none
    # may come from the prefix cache.
    whole_prompt = "steering_capture" in extra or (resolved is not None and resolved.gate is not None)
    if resolved is not None:
        extra["steering"] = resolved.wire
        salt = steering_salt(resolved.cache_namespace(seam.request_prompt_length(request)), salt)
    else:  # nothing to apply: the request is unsteered, and shares its cache
        extra.pop("steering", None)
        salt = None
    seam.update_request(request, extra, cache_salt=salt, compute_whole_prompt=whole_prompt)
