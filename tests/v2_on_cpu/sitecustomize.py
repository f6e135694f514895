"""Test-only startup hook: run vLLM's Model Runner V2 on a CPU through Triton's interpreter.

Put this folder on ``PYTHONPATH`` and set ``VLLM_STEER_TEST_V2_ON_CPU=1``. Python imports
``sitecustomize`` at startup in every process, so the hook is in place in the test process,
the EngineCore process and every worker process (vLLM spawns them on CPU; they inherit
``PYTHONPATH`` and the flag).

Why: on a CPU build vLLM keeps ``HAS_TRITON`` only if Triton has a ``"cpu"`` backend
(``vllm/triton_utils/importing.py``); without it ``VllmConfig`` refuses Model Runner V2,
whose bookkeeping is written as ``@triton.jit`` kernels. With the flag set this hook:

1. sets ``TRITON_INTERPRET=1`` (before Triton is imported), so every ``@triton.jit``
   kernel runs through Triton's numpy interpreter on CPU tensors;
2. after ``triton.backends`` is imported, adds a stand-in ``"cpu"`` entry to
   ``triton.backends.backends`` whose driver reports itself inactive, so vLLM keeps
   Triton on while Triton itself never selects that backend;
3. after ``vllm.v1.sample.ops.topk_topp_sampler`` is imported, points its
   ``apply_top_k_top_p_triton`` at the PyTorch twin ``apply_top_k_top_p_pytorch``: the
   top-k/top-p kernel uses a ``tl.range`` variable as a tensor, which the interpreter
   rejects. Greedy sampling never reaches it.

Steps 2 and 3 are post-import patches done by a ``sys.meta_path`` finder, so nothing heavy
is imported at interpreter startup. Without the flag the hook imports nothing and changes
nothing. Either way, a ``sitecustomize`` this file shadows (one later on ``sys.path``) is
still run. Production code never imports this module: it lives under ``tests/`` only.
"""

import os
import sys

FLAG = "VLLM_STEER_TEST_V2_ON_CPU"
_HERE = os.path.dirname(os.path.realpath(__file__))


# ---- post-import patches ---------------------------------------------------------------
class _InactiveCPUDriver:
    """Stand-in driver for the fake ``"cpu"`` backend: never active, so never selected."""

    @staticmethod
    def is_active() -> bool:
        return False


class _UnusedCPUCompiler:
    """Stand-in compiler for the fake ``"cpu"`` backend: the interpreter compiles nothing."""

    @staticmethod
    def supports_target(target) -> bool:
        return False


def _patch_triton_backends(module) -> None:
    if "cpu" not in module.backends:
        module.backends["cpu"] = module.Backend(compiler=_UnusedCPUCompiler, driver=_InactiveCPUDriver)


def _patch_topk_topp_sampler(module) -> None:
    pytorch_impl = module.apply_top_k_top_p_pytorch

    def apply_top_k_top_p_triton(logits, k, p):
        # CPU tensors only here: a host sync is fine (what the non-Triton CPU path does).
        return pytorch_impl(logits, k, p, allow_cpu_sync=True)

    apply_top_k_top_p_triton._v2_on_cpu = True
    module.apply_top_k_top_p_triton = apply_top_k_top_p_triton


_PATCHES = {
    "triton.backends": _patch_triton_backends,
    "vllm.v1.sample.ops.topk_topp_sampler": _patch_topk_topp_sampler,
}


class _PatchingLoader:
    """Wraps a module's real loader and applies a patch once the module has executed."""

    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        return getattr(self._loader, name)


class _PostImportPatcher:
    """``sys.meta_path`` finder: finds the target modules with the other finders, then wraps
    their loader so the patch runs right after the module body."""

    def find_spec(self, fullname, path=None, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def _activate() -> None:
    # Read by triton.knobs when Triton is imported; spawned children inherit it too.
    os.environ["TRITON_INTERPRET"] = "1"
    sys.meta_path.insert(0, _PostImportPatcher())
    for name, patch in _PATCHES.items():  # already imported (should not happen at startup)
        if name in sys.modules:
            patch(sys.modules[name])


# ---- chain to a sitecustomize this one shadows -------------------------------------------
def _chain_shadowed() -> None:
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    others = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
    spec = PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    if spec.origin and os.path.realpath(spec.origin) == os.path.realpath(__file__):
        return
    module = module_from_spec(spec)
    sys.modules["_shadowed_sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get(FLAG) == "1":
    _activate()
_chain_shadowed()
