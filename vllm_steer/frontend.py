"""Front-end side: validate, resolve and salt every request's steering before it is queued.

Every entry path (the offline ``LLM``, the OpenAI server, raw ``extra_args``, pre-built
``EngineCoreRequest``s) hands each request once to ``InputProcessor.assign_request_id``
before queueing it, so the plugin wraps that. For a request with
``extra_args["steering"]`` it
1. resolves the spec against the model and the front end's vector registry (a bad spec
   raises a 400-class ``VLLMValidationError`` naming the field, before the engine sees it);
2. replaces it with the resolved spec (vectors by digest), so the worker applies exactly
   what was validated, even if a name is re-registered meanwhile;
3. folds the spec's content fingerprint into ``cache_salt``: vLLM's prefix-cache hashes
   cover the salt but not ``extra_args``, so without this a steered request's KV blocks
   would be reused by unsteered or differently steered requests with the same prompt.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from vllm.exceptions import VLLMValidationError

from vllm_steer.config import ARCHITECTURE, SteeringConfig
from vllm_steer.resolve import ResolvedSteering, check_layer, resolve
from vllm_steer.spec import DIGEST_PREFIX, CaptureSpec, SteeringError, parse_capture
from vllm_steer.vectors.registry import Vector
from vllm_steer.vectors.store import RegistryStore

SALT_PREFIX = "vllm-steer:"
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


def steering_salt(fingerprint: str, user_salt: str | None) -> str:
    """The cache namespace of a steered request: its content, plus any salt of the user's."""
    if user_salt is None:
        return SALT_PREFIX + fingerprint
    return SALT_PREFIX + hashlib.sha256(f"{fingerprint}\0{user_salt}".encode()).hexdigest()[:32]


class SteeringFrontend:
    """The front end's view of the served model: its shape, and a registry mirroring the
    workers' (plus, with ``registry_dir``, the run-time changes every front end shares)."""

    def __init__(self, hf_config: Any):
        self.settings = SteeringConfig.from_hf_config(hf_config)
        self.shape = self.settings.model_shape(hf_config)
        self.registry = self.settings.load_registry()
        self.store = RegistryStore(self.settings.registry_dir) if self.settings.registry_dir else None
        self.refresh()

    def refresh(self) -> None:
        if self.store is not None:
            self.store.refresh(self.registry)

    def resolve(self, spec: Any) -> ResolvedSteering | None:
        self.refresh()
        return resolve(spec, self.shape, self.registry)

    def check_capture(self, value: Any) -> CaptureSpec:
        capture = parse_capture(value)
        if not self.settings.capture:
            raise SteeringError("capture is off on this server; start it with capture on (hf_overrides steering.capture)", "steering_capture")
        for position, layer in enumerate(capture.layers):
            check_layer(layer, self.shape, f"steering_capture.layers[{position}]")
        return capture

    # ---- registry changes: check, then (after the workers have it) commit ---------------
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
        if self.store is not None:
            self.store.put(name, vector, digest=digest, source=source, replace=replace)
        logger.info("steering registry: %s %r = %s (%s)", "replaced" if replace else "added", name, digest, source)
        return digest

    def remove_vector(self, name: str) -> None:
        self.refresh()
        if name not in self.registry:
            raise KeyError(name)
        self.registry.remove(name)
        if self.store is not None:
            self.store.delete(name)
        logger.info("steering registry: deleted %r", name)


_LOCK = threading.Lock()


def frontend_of(input_processor: Any) -> SteeringFrontend | None:
    """The SteeringFrontend of an engine's InputProcessor; None if the model is not steerable."""
    frontend = getattr(input_processor, "_vllm_steer", None)
    if frontend is None:
        with _LOCK:
            frontend = getattr(input_processor, "_vllm_steer", None)
            if frontend is None:
                hf_config = input_processor.model_config.hf_config
                steerable = ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])
                frontend = SteeringFrontend(hf_config) if steerable else False
                input_processor._vllm_steer = frontend
    return frontend or None


def prepare_request(frontend: SteeringFrontend | None, request: Any) -> None:
    """Resolve and salt one EngineCoreRequest in place (see the module docstring)."""
    if (request.cache_salt or "").startswith(SALT_PREFIX):
        # Otherwise an unsteered request could write KV blocks into a steered namespace.
        raise SteeringRequestError(SteeringError(f"may not start with {SALT_PREFIX!r} (reserved for steering)", "cache_salt"))
    params = request.sampling_params
    extra = getattr(params, "extra_args", None)
    if not extra or ("steering" not in extra and "steering_capture" not in extra):
        return
    if frontend is None:
        raise SteeringRequestError(
            SteeringError(
                f"needs the {ARCHITECTURE} architecture; start the engine with "
                f'hf_overrides={{"architectures": ["{ARCHITECTURE}"]}} (launch.py and vllm_steer.SteeredLLM do this)'
            )
        )
    extra = dict(extra)
    try:
        if "steering_capture" in extra:
            extra["steering_capture"] = frontend.check_capture(extra["steering_capture"]).model_dump_json()
            # Every captured token must be computed, not read from the prefix cache.
            params.skip_reading_prefix_cache = True
        resolved = frontend.resolve(extra["steering"]) if "steering" in extra else None
    except SteeringError as exc:
        raise SteeringRequestError(exc) from None
    if resolved is not None:
        extra["steering"] = resolved.wire()
        request.cache_salt = steering_salt(resolved.fingerprint, request.cache_salt)
    else:  # nothing to apply: the request is unsteered, and shares its cache
        extra.pop("steering", None)
    params.extra_args = extra or None


def install() -> None:
    """Wrap ``InputProcessor.assign_request_id``: the one call every entry path makes exactly
    once per request, after the request is built (pre-built EngineCoreRequests included)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.__dict__["assign_request_id"]
    if getattr(original, "_vllm_steer", False):
        return
    assign = original.__func__ if isinstance(original, staticmethod) else original

    def assign_request_id(self, request):
        prepare_request(frontend_of(self), request)
        return assign(request)

    assign_request_id._vllm_steer = True
    InputProcessor.assign_request_id = assign_request_id
