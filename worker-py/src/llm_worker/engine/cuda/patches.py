"""Everything the CUDA engine changes inside Transformers' continuous-batching manager, and the version check that
guards it.

The manager has no extension points for what the engine needs, so the engine reaches into private internals: it swaps
the class of the manager's logits-processor list (``install_fast_sampling``), replaces methods on the instances of the
batch processor's host/device IO objects and model runner (``hook_fast_sampling``), creates the batch processor
itself (``create_batch_processor``) and sets the decode path's ``max_blocks_per_request``
(``enable_decode_fast_path``); its attention function reads the paged cache's fields (attention.py) and the engine
reads the scheduler's and the cache's counters for its stats. None of this is public API: it was written against
transformers 5.17.0 (worker-py/requirements.txt) and may change in any release, silently or not. So the engine checks
the installed version at start-up (``check_transformers_version``) and refuses another one unless the operator sets
``CUDA_PATCHES_ALLOW_ANY_TRANSFORMERS=1`` (worker config ``cuda_patches_allow_any_transformers``), which logs a
warning and goes on: the CPU test suite (tests/test_cuda_cb_engine.py) is what tells whether a new version still works.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ...errors import ConfigError
from .constrained import BatchMasks, GrammarTable

logger = logging.getLogger(__name__)

# The versions these patches were written and tested for: the pinned one (requirements.txt) and its patch releases.
SUPPORTED_TRANSFORMERS = ">=5.17.0,<5.18.0"
ALLOW_ANY_TRANSFORMERS_ENV = "CUDA_PATCHES_ALLOW_ANY_TRANSFORMERS"


class UnsupportedTransformersVersion(ConfigError):
    """The installed Transformers is not one the manager patches were written for (the worker exits with status 2)."""


def check_transformers_version(allow_any: bool = False) -> str:
    """Return the installed Transformers version; raise UnsupportedTransformersVersion when it is outside
    SUPPORTED_TRANSFORMERS, unless ``allow_any`` (then log a warning)."""
    import transformers
    from packaging.specifiers import SpecifierSet

    installed = str(transformers.__version__)
    if SpecifierSet(SUPPORTED_TRANSFORMERS).contains(installed, prereleases=True):
        return installed
    message = (f"transformers {installed} is installed, but the cuda-cb engine patches private internals of "
               f"transformers{SUPPORTED_TRANSFORMERS} (the pinned 5.17.0 of worker-py/requirements.txt)")
    if allow_any:
        logger.warning("%s; going on because %s=1: run worker-py/tests/test_cuda_cb_engine.py against this version",
                       message, ALLOW_ANY_TRANSFORMERS_ENV)
        return installed
    raise UnsupportedTransformersVersion(f"{message}. Install transformers==5.17.0, or set "
                                         f"{ALLOW_ANY_TRANSFORMERS_ENV}=1 to run with this version anyway.")


# -------------------------------------------------------------------------------------------------- start-up
def enable_decode_fast_path(manager, max_blocks_per_request: int) -> None:
    """Turn the manager's block-table decode path on (it enables it only for flash-attn's kernels); the engine's
    attention function serves it (attention.py)."""
    manager.continuous_batching_config.max_blocks_per_request = max_blocks_per_request


def create_batch_processor(manager):
    """Create the manager's batch processor now (it reuses this one in start()) and zero its paged cache: the
    manager's warm-up attends over the whole (torch.empty) cache, and NaN bit patterns left in reused GPU memory then
    reach multinomial sampling, a device-side assert that kills the CUDA context."""
    manager.batch_processor = manager._create_batch_processor()
    cache = manager.batch_processor.cache
    for tensor in list(cache.key_cache) + list(cache.value_cache):
        tensor.zero_()
    return manager.batch_processor


# --------------------------------------------------------------------------------------------------- sampling
GREEDY, PLAIN, PLAIN_G, FULL, FULL_G = "greedy", "plain", "plain+greedy", "full", "full+greedy"


def install_fast_sampling(logit_processor, vocab_size: int) -> bool:
    """Turn the manager's per-request temperature / top-k / top-p processor list into one whose work is chosen per
    batch on the host (see ``FastSamplingList``). False (nothing changed) when the list is not the expected three."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
        ContinuousBatchingTemperatureLogitsWarper,
        ContinuousBatchingTopKLogitsWarper,
        ContinuousBatchingTopPLogitsWarper,
    )

    if not isinstance(logit_processor, ContinuousBatchingLogitsProcessorList):
        return False
    kinds = [ContinuousBatchingTemperatureLogitsWarper, ContinuousBatchingTopKLogitsWarper,
             ContinuousBatchingTopPLogitsWarper]
    procs = list(logit_processor.logits_processor)
    if len(procs) != 3 or sorted(type(p).__name__ for p in procs) != sorted(k.__name__ for k in kinds):
        return False
    index = {kind: next(i for i, p in enumerate(procs) if isinstance(p, kind)) for kind in kinds}

    class FastSamplingList(type(logit_processor)):
        """The manager's processor list, with ``__call__`` doing only what the batch needs. The batch's mode is computed
        on the host when its tensors are prepared (``mode_for``), is part of the CUDA-graph key, and is read when the
        step is traced or run eagerly: greedy (argmax, no softmax), plain (temperature; greedy rows masked to their
        argmax; no sort), full (plain + one descending sort serving both top-k and top-p)."""

        def mode_for(self, requests_in_batch) -> str:
            any_greedy = any_sampled = any_filter = False
            for fs in requests_in_batch:
                if not fs.has_new_token:
                    continue
                kw = fs.state.logit_processor_kwargs
                top_k = max(int(kw.get("top_k", self._fs_defaults[1])), 1)
                if top_k == 1:
                    any_greedy = True
                    continue
                any_sampled = True
                if top_k < self._fs_vocab or float(kw.get("top_p", self._fs_defaults[2])) < 1.0:
                    any_filter = True
            if not any_sampled:
                return GREEDY
            if any_filter:
                return FULL_G if any_greedy else FULL
            return PLAIN_G if any_greedy else PLAIN

        def __call__(self, input_ids, scores, logits_processor_args):
            if self.grammar_masks is not None:  # structured outputs (constrained.py): before any other processing
                scores = self.grammar_masks.apply(scores)
            mode = self.active_mode
            if mode is None:
                return super().__call__(input_ids, scores, logits_processor_args)
            if mode == GREEDY:
                return scores  # the runner takes the argmax (do_sample is off for this mode)
            i_t, i_k, i_p = self._fs_index
            rows, vocab = scores.shape
            temperature = logits_processor_args[i_t][:rows].view(dtype=torch.float32)
            top_k = logits_processor_args[i_k][:rows]
            scores = scores / temperature.unsqueeze(-1)
            if mode in (PLAIN_G, FULL_G):  # greedy rows (top_k == 1): everything but the argmax is filtered out
                greedy = (top_k <= 1).unsqueeze(-1)
                best = scores.argmax(dim=-1, keepdim=True)
                drop = greedy & (torch.arange(vocab, device=scores.device).unsqueeze(0) != best)
                scores = scores.masked_fill(drop, float("-inf"))
            if mode in (FULL, FULL_G):
                top_p = logits_processor_args[i_p][:rows].view(dtype=torch.float32)
                ranked = torch.sort(scores, dim=-1, descending=True)[0]  # one sort for top-k and top-p
                kth = ranked.gather(1, (top_k.clamp(1, vocab) - 1).to(torch.int64).unsqueeze(-1))
                ranked = ranked.masked_fill(ranked < kth, float("-inf"))  # top-k (ties with the k-th kept)
                probs = ranked.softmax(dim=-1)
                # top-p as in Transformers: drop a token when the probability mass at or below it is <= 1 - top_p
                mass_at_or_below = probs.flip(-1).cumsum(dim=-1).flip(-1)  # summed from the smallest, as there
                drop = mass_at_or_below <= (1.0 - top_p).unsqueeze(-1)
                drop[:, 0] = False
                keep = (~drop).sum(dim=-1, keepdim=True)
                threshold = torch.maximum(kth, ranked.gather(1, keep - 1))
                scores = scores.masked_fill(scores < threshold, float("-inf"))
            return scores

    logit_processor.__class__ = FastSamplingList
    logit_processor.active_mode = None
    logit_processor.grammar_masks = None
    logit_processor._fs_index = (index[kinds[0]], index[kinds[1]], index[kinds[2]])
    logit_processor._fs_defaults = (procs[index[kinds[0]]].temperature, procs[index[kinds[1]]].top_k,
                                    procs[index[kinds[2]]].top_p)
    logit_processor._fs_vocab = vocab_size
    return True


def hook_fast_sampling(batch_processor, grammars: Optional[GrammarTable] = None) -> None:
    """Wire a ``FastSamplingList`` into the batch processor (instance attributes only): each host IO records its
    batch's mode when it prepares the batch, each device IO adds that mode to its CUDA-graph key, and the model runner
    sets the processor's mode (and argmax vs sampling) before each step.

    With ``grammars`` (structured outputs; synchronous batching only, see constrained.py) the host also builds the
    batch's grammar masks when it prepares it, a step with masks runs eagerly (not from a CUDA graph), and each step's
    update first feeds the new tokens to their requests' matchers, ending a request whose grammar is complete."""
    lp = batch_processor.logit_processor
    ios = batch_processor.inputs_and_outputs
    if grammars is not None and hasattr(ios, "io_pairs"):
        raise ValueError("structured outputs need synchronous batching: the masks of step N+1 need step N's tokens")
    pairs = [(p.host_io, p.device_io) for p in ios.io_pairs] if hasattr(ios, "io_pairs") else [(ios, ios)]
    for host, device in pairs:
        host.sampling_mode = FULL_G
        host.grammar_masks = None

        def prepare(requests_in_batch, logits_processors, *args, _host=host, _orig=host.prepare_batch_tensors,
                    **kwargs):
            _host.sampling_mode = lp.mode_for(requests_in_batch)
            _host.grammar_masks = _grammar_masks(grammars, requests_in_batch) if grammars else None
            return _orig(requests_in_batch, logits_processors, *args, **kwargs)

        def graph_key(_host=host, _orig=device._get_graph_key):
            return (*_orig(), _host.sampling_mode)

        host.prepare_batch_tensors = prepare
        device._get_graph_key = graph_key
    runner = batch_processor.model_runner
    sample_default = runner.do_sample

    def current_host():
        return ios.io_pairs[ios.current_pair].host_io if hasattr(ios, "io_pairs") else ios

    def compute_batch(model, batch_data, _orig=runner.compute_batch):
        host = current_host()
        lp.active_mode = host.sampling_mode
        lp.grammar_masks = host.grammar_masks
        runner.do_sample = sample_default and lp.active_mode != GREEDY
        graphs = (runner.use_cuda_graph_varlen, runner.use_cuda_graph_decode)
        if lp.grammar_masks is None or not any(graphs):
            return _orig(model, batch_data)
        # A captured graph would replay the masks it was captured with: this step runs eagerly.
        runner.use_cuda_graph_varlen = runner.use_cuda_graph_decode = False
        try:
            return _orig(model, batch_data)
        finally:
            runner.use_cuda_graph_varlen, runner.use_cuda_graph_decode = graphs

    runner.compute_batch = compute_batch
    if grammars is not None:
        def update_batch(_orig=batch_processor.update_batch):
            if grammars:
                requests_in_batch, new_tokens, _ = ios.prepare_batch_update()  # sync mode: a read of the outputs
                _observe_tokens(grammars, requests_in_batch, new_tokens)
            return _orig()

        batch_processor.update_batch = update_batch


# ------------------------------------------------------------------------------------- structured outputs
def _produced(state) -> list[int]:
    """The request's output so far; after a re-prefill (offloading) the manager moved it into the prompt."""
    if state._true_initial_tokens:
        return state.initial_tokens[state._true_initial_tokens:] + state.generated_tokens
    return state.generated_tokens


def _grammar_masks(grammars: GrammarTable, requests_in_batch) -> Optional[BatchMasks]:
    rows, positions = [], []
    row = 0
    for fs in requests_in_batch:
        if not fs.has_new_token:
            continue  # a prefill chunk before the prompt's last: no logits row in this step
        request = grammars.get(fs.state.request_id)
        if request is not None:
            rows.append((request, _produced(fs.state)))
            positions.append(row)
        row += 1
    return grammars.masks_for(rows, positions) if rows else None


def _observe_tokens(grammars: GrammarTable, requests_in_batch, new_tokens: list[int]) -> None:
    """Feed each constrained request its new token before the manager's update appends it; a request whose grammar
    ends with it gets a token limit of its current length + 1, so the update finishes it with this token."""
    row = 0
    for fs in requests_in_batch:
        if not fs.has_new_token:
            continue
        token = new_tokens[row]
        row += 1
        request = grammars.get(fs.state.request_id)
        if request is None or request.ended:
            continue
        state = fs.state
        request.catch_up(_produced(state))
        request.accept(token)
        if request.ended:
            state._new_tokens_limit = min(state._new_tokens_limit, state.generated_len() + 1)
