"""Worker side: admit a request into a slot, give it its rows, and fill each step's
token -> row index.

A slot is a running request's entry: per steerable layer, the row of the shared pool
(rows.py) that holds its steering there (``row_of_slot[layer, slot]``), and which positions
read it (``stages``). Slot 0 reads row 0 (zeros) everywhere: no steering. Rows are built
once per distinct content, on admission; admission and release edit host copies of the slot
tables, which ``flush`` moves to the device before the next step, one copy per table; each
step only maps tokens to slots to rows, with tensor ops.

A request with a condition (resolve.Gate) has a second column, ``num_slots + slot``: its
prompt tokens read the gate row there, whose first direction's reading the layer sums into
``gate_sum[num_slots + slot]``. Its generated tokens come in later steps, after the whole
prompt has been read, and read the steering column only where the mean passes: computed on
the device when the step's index is written, so the host never waits for it. The host only
counts each staged slot's scheduled tokens, to know when no prompt is left to read.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from vllm_steer.core.capture import CaptureTables
from vllm_steer.core.plan import ModelShape, ResolvedSteering
from vllm_steer.core.registry import VectorRegistry, vector_from_wire
from vllm_steer.core.rows import RowPool, build_gate_row, build_row, worst_case_rows
from vllm_steer.core.spec import CaptureSpec
from vllm_steer.core.staging import HostCopy, HostTable, to_device

# What the workers serve over the control plane (engine/rpc.py builds the calls).
WORKER_OPS = ("add_vector", "remove_vector", "stats", "collect_captures")

logger = logging.getLogger("vllm_steer")

# Histogram bounds for "distinct steering configs among the admitted requests, per step".
STEP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


NO_CONDITION = (0.0, -1.0)  # (gate_scale, gate_bound) of a slot without one: 0 > -1 holds


def slot_stages(apply_to: str, slot: int, prompt_len: int, gate_column: int | None = None) -> tuple[int, int, int, int]:
    """The position where a slot's second stage starts, and the columns its tokens read
    before it, from it on, and from it on while its condition holds. A gated slot's prompt
    reads its gate column; its generated tokens steer once the condition holds."""
    if gate_column is not None:
        return prompt_len, gate_column, 0, slot
    if apply_to == "prompt":
        return prompt_len, slot, 0, 0
    if apply_to == "generated":
        return prompt_len, 0, slot, slot
    return 0, 0, slot, slot  # "all"


class SteeringRuntime:
    """Owns the slots and the row pool of one model replica (one worker)."""

    def __init__(
        self,
        shape: ModelShape,
        registry: VectorRegistry,
        layers: dict[int, Any],
        num_slots: int,
        max_tokens: int,
        capture: bool = False,
        kernel: str = "torch",
    ):
        self.shape = shape
        self.registry = registry
        self.layers = layers
        self.num_slots = num_slots
        self.layer_order = tuple(sorted(layers))
        # Never more rows than every slot steering every local layer differently can use.
        worst_case = worst_case_rows(num_slots - 1, len(layers), shape.max_directions)
        self.pool = RowPool(min(shape.table_rows or worst_case, worst_case), shape.hidden_size, shape.max_directions)
        # Which column of row_of_slot each token of the flattened batch reads (its slot, the
        # slot's gate column, or 0), and per local layer the pool row each token reads
        # (token_row[n] is layer_order[n]'s).
        self.token_slot = torch.zeros(max_tokens, dtype=torch.int64)
        self._token_index = torch.arange(max_tokens, dtype=torch.int64)  # 0..max_tokens-1, for _token_slots
        self.token_row = torch.zeros(len(layers), max_tokens, dtype=torch.int64)
        self.row_of_slot = torch.zeros(len(layers), 2 * num_slots, dtype=torch.int64)
        # A slot's tokens read one column of row_of_slot before a position and another from it
        # on (slot_stages; a gated prompt is read through the gate column). Per slot: that
        # position, the two columns, and the column read from it on while the slot's condition
        # holds. One tensor, so admission writes a slot's entry in one copy.
        self.stages = torch.zeros(4, num_slots, dtype=torch.int64)
        self.switch, self.column_before, self.column_after, self.column_if_held = self.stages.unbind(0)
        self.stage_column = self.stages[1:3].reshape(-1)  # a view: every slot's before, then after
        # Conditions: a slot's holds where ``gate_scale * sum > gate_bound``, its gate column's
        # sum scaled to the mean (the sign flips a "below"); no condition: 0 > -1, always held.
        # And what the layers sum per column (only the gate columns' sums are read).
        self.gate = torch.zeros(2, num_slots, dtype=torch.float32)
        self.gate_scale, self.gate_bound = self.gate.unbind(0)
        self.gate_bound.fill_(NO_CONDITION[1])
        self.gate_sum = torch.zeros(2 * num_slots, dtype=torch.float32)
        self.gate_read = self.gate_sum[num_slots:]  # the gate columns' sums, by slot
        # Admission and release edit host copies of the slot tables; flush moves each to the
        # device in one copy before the step that reads it, however many requests changed.
        self._host_rows = HostTable(self.row_of_slot)
        self._host_stages = HostTable(self.stages)
        self._host_gate = HostTable(self.gate)
        self._gate_restarts: set[int] = set()  # gated slots admitted since: their sums restart at flush
        self._gates_leaving: list[int] = []  # gated slots released since: their outcomes, read first
        # Staged slots whose prompt is not all scheduled yet: its tokens left (host counts).
        # While any is left, a step may hold tokens before their slot's switch, and may change
        # a gate's sum (so the next step recomputes the outcomes); once none is, every token
        # reads its slot's column_after.
        self._prompt_left: dict[int, int] = {}
        self._outcomes_stale = False
        for n, index in enumerate(self.layer_order):
            layers[index].attach_steering(self.token_row[n], self.pool, kernel, self.token_slot, self.gate_sum)
        self.capture = CaptureTables(layers, num_slots, max_tokens, shape.hidden_size) if capture else None
        self._free = list(range(num_slots - 1, 0, -1))
        self._slot_of: dict[str, int] = {}
        self._keys_of: dict[int, tuple[Hashable, ...]] = {}  # the pool rows each slot holds
        self._gated: set[int] = set()  # slots with a condition
        self._staged: set[int] = set()  # slots whose tokens do not all read one column
        self._gate_outcomes: list[HostCopy] = []  # whether the released gated requests' conditions held
        self._conditions = Counter()  # "held" / "not_held"
        self._peak_rows = 0
        self.runner: str | None = None  # which model runner drives the writes ("v1"/"v2")
        # Requests that asked for steering or capture and run without it (see admit).
        self.unapplied = 0
        # Observability: the steering config (fingerprint) of each slot, and per-step counts.
        self._config_of: dict[int, str] = {}
        self._live_configs: Counter[str] = Counter()
        self._step_counts = [0] * (len(STEP_BUCKETS) + 1)
        self._step_sum = 0

    # ---- admission -------------------------------------------------------------------
    def admit(self, req_id: str, extra_args: Mapping[str, Any] | None, prompt_len: int) -> int:
        """Give ``req_id`` a slot holding its steering (and capture), which ride in its sampling
        params' ``extra_args`` (resolved by the front end); 0 when it has neither.
        Never raises: an exception here would kill the engine. A request whose steering
        cannot be applied (no slot free, its vector no longer held) runs without it,
        logged and counted in ``unapplied``."""
        self.release(req_id)
        extra = extra_args or {}
        slot = 0
        if "steering" in extra or "steering_capture" in extra:
            try:
                slot = self._admit(extra, prompt_len)
            except Exception as exc:  # noqa: BLE001 - see docstring
                self.unapplied += 1
                logger.warning("request %s runs unsteered: its steering could not be applied: %s", req_id, exc)
        self._slot_of[req_id] = slot
        return slot

    def _admit(self, extra: dict, prompt_len: int) -> int:
        # The front end resolved and checked both: here they are only decoded.
        resolved = ResolvedSteering.from_wire(extra["steering"]) if "steering" in extra else None
        capture = CaptureSpec.model_validate_json(extra["steering_capture"]) if "steering_capture" in extra else None
        if capture is not None and self.capture is None:
            raise ValueError("capture is off on this engine (hf_overrides steering.capture)")
        if not self._free:
            raise RuntimeError(f"all {self.num_slots - 1} steering slots are in use")
        slot = self._free.pop()
        try:
            self._fill(slot, resolved, capture, prompt_len)
        except BaseException:
            self._clear(slot)
            self._free.append(slot)
            raise
        return slot

    def _fill(self, slot: int, resolved: ResolvedSteering | None, capture: CaptureSpec | None, prompt_len: int) -> None:
        keys = {layer: key for layer, key in resolved.row_keys.items() if layer in self.layers} if resolved else {}
        gate = resolved.gate if resolved else None
        if gate is not None and gate.layer not in self.layers:
            raise RuntimeError(f"the condition's layer {gate.layer} is not steerable on this worker")
        if keys or gate:
            hidden = self.shape.hidden_size
            needed = [*keys.values(), *([gate.row_key] if gate else [])]
            # Rows are built only for content the pool does not hold yet, once per content
            # (layers steered alike share a row).
            missing = {key for key in needed if not self.pool.held(key)}
            vectors = resolved.arrays(self.registry) if missing else {}
            built = {}
            for layer, key in keys.items():
                if key in missing and key not in built:
                    built[key] = build_row(resolved, layer, vectors, hidden)
            if gate is not None and gate.row_key in missing:
                built[gate.row_key] = build_gate_row(gate, vectors, hidden)
            row_of = self.pool.acquire(needed, built)
            self._keys_of[slot] = tuple(needed)
            self._peak_rows = max(self._peak_rows, self.pool.in_use)
            # Per local layer: the row of the slot's steering; at the gate's layer, of its gate.
            self._host_rows.write((slice(None), slot), [row_of[keys[index]] if index in keys else 0 for index in self.layer_order])
            if gate is not None:
                self._host_rows.write((self.layer_order.index(gate.layer), self.num_slots + slot), row_of[gate.row_key])
        gate_column = None
        if gate is not None:
            gate_column = self.num_slots + slot
            sign = 1.0 if gate.compare == "above" else -1.0
            self._host_gate.write((slice(None), slot), (sign / prompt_len, sign * gate.threshold))
            self._gate_restarts.add(slot)  # a resumed request reads its prompt again
            self._gated.add(slot)
        stages = slot_stages(resolved.apply_to if resolved else "all", slot, prompt_len, gate_column)
        self._host_stages.write((slice(None), slot), stages)
        if stages != slot_stages("all", slot, prompt_len):
            self._staged.add(slot)
            self._prompt_left[slot] = prompt_len  # every stage switches where the prompt ends
        if capture is not None:
            self.capture.start(slot, capture, prompt_len)
        if resolved is not None:
            self._config_of[slot] = resolved.fingerprint
            self._live_configs[resolved.fingerprint] += 1

    def release(self, req_id: str) -> None:
        slot = self._slot_of.pop(req_id, 0)
        if slot == 0:
            return
        try:
            if slot in self._gate_restarts:  # left before its first step: never steered
                self._conditions["not_held"] += 1
            elif slot in self._gated:
                self._gates_leaving.append(slot)  # read at the next flush, before the tables change
            if self.capture is not None:
                self.capture.finish(slot)
        finally:
            self._clear(slot)
            self._free.append(slot)

    def _clear(self, slot: int) -> None:
        """Return a slot's rows to the pool and forget its bookkeeping."""
        config = self._config_of.pop(slot, None)
        if config is not None:
            self._live_configs[config] -= 1
            if not self._live_configs[config]:
                del self._live_configs[config]
        keys = self._keys_of.pop(slot, None)
        if keys:
            self.pool.release(keys)
            self._host_rows.write((slice(None), [slot, self.num_slots + slot]), 0)
        self._staged.discard(slot)
        self._prompt_left.pop(slot, None)
        self._host_stages.write((slice(None), slot), 0)
        if slot in self._gated:
            self._gated.discard(slot)
            self._gate_restarts.discard(slot)
            self._host_gate.write((slice(None), slot), NO_CONDITION)

    def _holds(self) -> torch.Tensor:
        """Per slot, whether its condition holds on the mean its gate has read (True without
        a condition). On the device: the host never reads it in the step path."""
        return self.gate_scale * self.gate_read > self.gate_bound

    def flush(self) -> None:
        """Write what admission and release changed since the last step to the device: new
        rows, the slot tables, restarted gate sums (each one copy or op), after reading the
        outcomes of the conditions of released requests from the tables they left."""
        self._read_gate_outcomes()
        self.pool.flush()
        if self._gate_restarts:
            restarts = torch.tensor([self.num_slots + slot for slot in self._gate_restarts], dtype=torch.int64)
            self.gate_sum.index_fill_(0, to_device(restarts, self.gate_sum.device), 0.0)
            self._gate_restarts.clear()
        pushed = [table.push() for table in (self._host_rows, self._host_stages, self._host_gate)]
        if any(pushed):  # the stages' push also overwrote column_after
            self._outcomes_stale = True

    def _token_slots(self, slot_per_request: torch.Tensor, tokens_per_request: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Each token's slot: its request's, found by where the token falls among the requests'
        cumulative counts. Not ``repeat_interleave(..., output_size=num_tokens)``: where the
        counts sum to fewer tokens (V2's adaptive speculative verification may schedule
        fewer) that fails, killing the engine (on a GPU, a device assert). Tokens past the
        counts read slot 0."""
        ends = torch.cumsum(tokens_per_request, 0)
        request = torch.searchsorted(ends, self._token_index[:num_tokens], right=True)
        last = slot_per_request.shape[0] - 1
        slots = slot_per_request.index_select(0, request.clamp(max=last))
        return slots.masked_fill_(request > last, 0)

    def _read_gate_outcomes(self) -> None:
        if self._gates_leaving:
            leaving = to_device(torch.tensor(self._gates_leaving, dtype=torch.int64), self.gate.device)
            self._gate_outcomes.append(HostCopy(self._holds().index_select(0, leaving)))  # copied back without waiting
            self._gates_leaving.clear()
            if len(self._gate_outcomes) > 64:  # fold the complete ones into the counts (never waits)
                self._condition_counts()

    def slot_of(self, req_id: str) -> int | None:
        return self._slot_of.get(req_id)

    def tracked(self) -> list[str]:
        return list(self._slot_of)

    @property
    def slots_in_use(self) -> int:
        return self.num_slots - 1 - len(self._free)

    # ---- per step ----------------------------------------------------------------------
    def fill_token_slot(
        self,
        slot_per_request: torch.Tensor,
        tokens_per_request: torch.Tensor,
        positions: torch.Tensor,
        num_tokens: int,
        num_padded: int,
        scheduled: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> None:
        """token_slot[:num_tokens] = each token's column of row_of_slot: its request's slot
        inside the slot's phase (under a condition, once the condition holds), the slot's
        gate column while a gated prompt is read, else 0; and token_row = each layer's row of
        that column. The padded tail reads column and row 0. ``scheduled``: the same step's
        slot and token count per request on the host, if the writer has them: once every
        staged slot's prompt has been read, a step is one gather, with no outcome to recompute."""
        self.flush()  # what requests admitted and released since the last step changed
        distinct = len(self._live_configs)
        self._step_counts[bisect_left(STEP_BUCKETS, distinct)] += 1
        self._step_sum += distinct
        if self.slots_in_use == 0:
            # Nothing steered: one cheap fill keeps every token (and padding) on slot 0.
            self.clear_step(num_padded)
            return
        # Every op here runs each step: index_select and out= spare torch's advanced-indexing
        # path and a copy each (a decode step's fill is a few dozen microseconds on a CPU).
        if num_tokens == slot_per_request.shape[0]:
            slots = slot_per_request  # a token per request (a step's requests each have >= 1): decode
        else:
            slots = self._token_slots(slot_per_request, tokens_per_request, num_tokens)
        pos = positions[:num_tokens]
        if self._staged:
            if self._gated and self._outcomes_stale:
                torch.mul(self.column_if_held, self._holds(), out=self.column_after)
            self._outcomes_stale = in_prompt = self._count_prompt_tokens(scheduled)
            if in_prompt:
                after = pos >= self.switch.index_select(0, slots)
                torch.index_select(self.stage_column, 0, torch.add(slots, after, alpha=self.num_slots), out=self.token_slot[:num_tokens])
            else:
                # Every prompt has been read: each token is past its slot's switch.
                torch.index_select(self.column_after, 0, slots, out=self.token_slot[:num_tokens])
        else:
            # Every live slot steers every position (the default): each token reads its slot.
            self.token_slot[:num_tokens] = slots
        if num_padded > num_tokens:
            self.token_slot[num_tokens:num_padded] = 0
        # Slot 0 maps to row 0 at every layer, so the padded tail needs no write of its own.
        self.token_row[:, :num_padded] = self.row_of_slot.index_select(1, self.token_slot[:num_padded])
        if self.capture is not None:
            self.capture.fill(slots, pos, num_tokens, num_padded)

    def _count_prompt_tokens(self, scheduled: tuple[Sequence[int], Sequence[int]] | None) -> bool:
        """Count this step's tokens against the staged slots' prompts not yet all scheduled;
        whether this step may read a prompt token of one. Tokens counted from admission are
        never more than the positions reached, so a prompt is taken as read only once it is
        (a prefix not computed here only delays that)."""
        if scheduled is None:
            return True  # the writer cannot tell: assume so
        if not self._prompt_left:
            return False
        for slot, count in zip(*scheduled):
            left = self._prompt_left.get(int(slot))
            if left is not None:
                if left <= count:
                    del self._prompt_left[int(slot)]
                else:
                    self._prompt_left[int(slot)] = left - int(count)
        return True

    def clear_step(self, num_tokens: int | None = None) -> None:
        """Every token reads slot 0 and nothing is captured (dummy runs, writer failures)."""
        self.token_slot[:num_tokens].zero_()
        self.token_row[:, :num_tokens].zero_()
        if self.capture is not None:
            self.capture.clear(num_tokens)

    # ---- control plane (engine/rpc.py sends these, over collective_rpc) ---------------------
    def rpc(self, op: str, *args: Any) -> Any:
        if op not in WORKER_OPS:
            raise ValueError(f"unknown steering operation {op!r}; known: {', '.join(WORKER_OPS)}")
        return getattr(self, op)(*args)

    def add_vector(self, name: str, raw: Any, source: str) -> str:
        return self.registry.add(name, vector_from_wire(raw), replace=True, source=source)

    def remove_vector(self, name: str) -> None:
        if name in self.registry:
            self.registry.remove(name)

    def collect_captures(self, keys: list[str]) -> dict:
        return self.capture.collect(keys) if self.capture is not None else {}

    def _condition_counts(self) -> dict[str, int]:
        """Released requests with a condition: how many steered (it held) and how many not.
        Counts only outcomes whose copy to the host is complete: this runs in the step path
        and in the stats call, and must never wait for the step in flight (one released just
        now is counted by a later call)."""
        self._read_gate_outcomes()
        pending = []
        for outcome in self._gate_outcomes:
            if not outcome.ready():
                pending.append(outcome)
                continue
            held = outcome.numpy()
            self._conditions["held"] += int(held.sum())
            self._conditions["not_held"] += held.size - int(held.sum())
        self._gate_outcomes = pending
        return {"held": self._conditions["held"], "not_held": self._conditions["not_held"]}

    def stats(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "slots_in_use": self.slots_in_use,
            "vectors": len(self.registry),
            "arrays": self.registry.content_size(),
            "unapplied_requests": self.unapplied,
            "conditions": self._condition_counts(),
            "table_rows": {"in_use": self.pool.in_use, "peak": self._peak_rows, "capacity": self.pool.capacity},
            "step_distinct_configs": {"counts": list(self._step_counts), "sum": self._step_sum},
        }
