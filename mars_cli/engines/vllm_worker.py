"""Mixed into every vLLM worker (`--worker-extension-cls`): a weight reload that is also right for tied embeddings.

`collective_rpc("mars_reload_weights", kwargs={"weights_path": DIR})` runs the worker's own
in-place `reload_weights(weights_path=DIR)` and then re-derives what vLLM derived from tied
weights at load time. Why: vLLM's in-place reload (model_executor/model_loader/reload/
layerwise.py, `finalize_layerwise_processing`) runs a module's `process_weights_after_loading`
only when the checkpoint held weights for that module. A tied output layer (Qwen's
`lm_head`, which shares `embed_tokens.weight`; the checkpoint has no `lm_head.weight`) gets
its parameter back, now holding the new values, but keeps whatever was computed from the old
ones. On the CPU that is the packed GEMM weight which computes the logits
(`UnquantizedEmbeddingMethod.process_weights_after_loading` → `dispatch_cpu_unquantized_gemm`),
so after a reload the logits came from the old output layer over the new model: log-probs
matching neither checkpoint. On GPUs that method does nothing, and re-running it costs
nothing. Untied models have nothing to re-derive.

Returns {"retied": [module names]} from each worker. This module imports vLLM only inside the
worker, where it already is.
"""

from __future__ import annotations


def tied_modules(model) -> list[tuple[str, object]]:
    """(name, module) of every module holding a parameter that another module also holds."""
    holders: dict[int, list[tuple[str, object]]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append((name, module))
    seen, out = set(), []
    for group in holders.values():
        if len(group) > 1:
            for name, module in group:
                if id(module) not in seen:
                    seen.add(id(module))
                    out.append((name, module))
    return out


def retie(model) -> list[str]:
    """Re-run the load-time processing of tied modules; only unquantized embeddings and heads,
    whose processing is a pure function of the weight (others are left as vLLM made them)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    done = []
    for name, module in tied_modules(model):
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(module)
            done.append(name)
    return done


class WorkerExtension:
    """The methods mars adds to vLLM's worker; `self` is the worker."""

    def mars_reload_weights(self, weights_path: str) -> dict:
        from vllm.config import set_current_vllm_config

        self.reload_weights(weights_path=weights_path)
        with set_current_vllm_config(self.vllm_config):
            return {"retied": retie(self.model_runner.get_model())}


EXTENSION = f"{__name__}.WorkerExtension"
