"""Static steering settings of a served model, carried in ``hf_overrides``.

    hf_overrides={"architectures": ["SteeredLlamaForCausalLM"],  # Steered + the model's own
                  "steering": {"vector_files": ["steering_vectors.pt"],
                               "max_directions": 4, "layers": None}}

vLLM sets dict-valued overrides on the HF config, so every process (front end and
workers) reads the same settings from ``hf_config.steering``. The steered architecture of a
model comes from its own config (families.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SteeringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Files loaded into every process's vector registry at start (see vectors/files.py).
    vector_files: tuple[str, ...] = ()
    # SAE decoders whose features the notebook's ``features`` form may name, read on
    # demand (see vectors/sae.py).
    sae: tuple[str, ...] = ()
    # Clamp/ablate/range directions one request may use per layer; 0 skips that math entirely.
    max_directions: int = Field(default=4, ge=0, le=64)
    # Operations one request may ask for: one per vector or feature per layer it steers
    # (a layered vector counts once per layer). Bounds a request's size and admission work.
    max_request_ops: int = Field(default=256, ge=1)
    # Allocate capture buffers, so requests may record the residual stream at steerable
    # layers (extraction). Costs one index_add per steerable layer per step.
    capture: bool = False
    # Server: a directory holding run-time registry changes, shared by every API server
    # process and reloaded on restart (None: changes live in each process's memory).
    registry_dir: str | None = None
    # Server: directories whose vector files POST /v1/steering/vectors may read.
    file_dirs: tuple[str, ...] = ()
    # Server limits: named vectors in the registry, and bytes in one request body.
    max_registry_vectors: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=16 << 20, ge=1024)
    # The layer math: torch ops, or the fused Triton kernel (kernels.py; needs Triton and a
    # GPU, or Triton's CPU interpreter). The GPU check (benchmarks/gpu_check.py) compares them.
    kernel: Literal["torch", "triton"] = "torch"
    # Layers that can be steered (None: all).
    layers: tuple[int, ...] | None = None
    # Device memory for the steering rows, in MiB (None: min(256 MiB, 1% of the device's
    # memory)). A row is one layer's steering of one distinct config, (1 + max_directions)
    # x hidden_size float32 values; identical configs share rows (rows.py). Requests whose
    # rows do not fit wait until rows free up (scheduler.py).
    table_budget_mib: float | None = Field(default=None, gt=0)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> SteeringConfig:
        return cls.model_validate(getattr(hf_config, "steering", None) or {})

    def model_shape(self, hf_config: Any, dtype: str = "float32", device_bytes: int | None = None, pipeline_stages: int = 1):
        """What validation needs to know about the served model (``dtype``: the one served;
        ``device_bytes``: the device's memory, for the default row budget; without it and
        without ``table_budget_mib`` the pool is not bounded)."""
        # torch: `import vllm_steer` stays light
        from vllm_steer.core.plan import ModelShape

        text = text_config(hf_config)
        return ModelShape(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            steerable_layers=self.steerable_layers(text.num_hidden_layers),
            max_directions=self.max_directions,
            max_request_ops=self.max_request_ops,
            dtype=dtype,
            table_rows=self.table_rows(text.hidden_size, device_bytes),
            pipeline_stages=pipeline_stages,
        )

    def table_rows(self, hidden: int, device_bytes: int | None) -> int | None:
        """Rows of the steering row pool (row 0 included) the budget holds."""
        # torch: `import vllm_steer` stays light
        from vllm_steer.core.rows import budget_rows, default_budget

        if self.table_budget_mib is not None:
            budget = int(self.table_budget_mib * (1 << 20))
        elif device_bytes is not None:
            budget = default_budget(device_bytes)
        else:
            return None
        return budget_rows(budget, hidden, self.max_directions)

    def load_registry(self, hf_config: Any = None):
        """The registry of the configured files; given the model's config, a vector or SAE
        of another hidden size or beyond the model's layers is refused at start."""
        # torch: `import vllm_steer` stays light
        from vllm_steer.vectors import load_registry

        if hf_config is None:
            return load_registry(self.vector_files, self.sae)
        text = text_config(hf_config)
        return load_registry(self.vector_files, self.sae, text.hidden_size, text.num_hidden_layers)

    def steerable_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(range(num_layers))
        bad = [layer for layer in self.layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"steering.layers {bad} out of range: the model has layers 0-{num_layers - 1}")
        return tuple(sorted(set(self.layers)))


def text_config(hf_config: Any) -> Any:
    """The language model's config (a multimodal model nests it)."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config


def hf_overrides(user_overrides: dict[str, Any] | None = None, *, architecture: str, **steering: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that select the steered ``architecture`` with these settings,
    merged with a caller's own ``hf_overrides`` (its ``steering`` dict merged key by key). A
    key set both ways to different values is refused: one of them would be dropped silently."""
    settings = SteeringConfig(**steering).model_dump(exclude_defaults=True)
    overrides: dict[str, Any] = {"architectures": [architecture]}
    user = dict(user_overrides or {})
    user_settings = dict(user.pop("steering", None) or {})
    for key, value in user_settings.items():
        if key in settings and _plain(settings[key]) != _plain(value):
            raise ValueError(
                f"hf_overrides['steering'][{key!r}] = {value!r} conflicts with the {key} argument ({settings[key]!r}): give it once"
            )
    if "architectures" in user and list(user["architectures"]) != overrides["architectures"]:
        raise ValueError(f"hf_overrides['architectures'] = {user['architectures']!r}: steering needs {overrides['architectures']!r}")
    merged = {**settings, **user_settings}
    if merged:
        SteeringConfig.model_validate(merged)  # an unknown or bad key fails here, naming itself
        overrides["steering"] = merged
    return {**user, **overrides}


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON has only lists)."""
    return list(value) if isinstance(value, (tuple, list)) else value
