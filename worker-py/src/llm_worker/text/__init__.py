"""Token ids → text for streaming: incremental detokenizer, stop strings, logprob token strings."""
