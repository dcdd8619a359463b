"""Write the bundled GGUF model out as a plain Transformers folder (config.json + safetensors + tokenizer), once.

`transformers serve` 5.17 cannot preload the GGUF itself: a GGUF config carries no `architectures`, and its model manager
does `getattr(transformers, config.architectures[0])`. So the comparison gives it the very same weights, dequantised to
fp32 exactly as our worker loads them (`from_pretrained(dir, gguf_file=…, dtype=torch.float32)`), saved with
save_pretrained. Usage: python bench/export_model.py OUT_DIR  (does nothing when OUT_DIR/config.json exists).
The export is checked: the saved folder reloads to identical weights.
"""

from __future__ import annotations

import os
import sys

from bench_model import load_bundled_model


def _check_same_weights(model, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    a, b = model.state_dict(), again.state_dict()
    bad = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    if bad:
        raise SystemExit(f"[export] reloaded weights differ: {bad[:5]}")


def main() -> None:
    out = sys.argv[1]
    if os.path.exists(os.path.join(out, "config.json")):
        return
    model, tok = load_bundled_model()
    model.config.architectures = [type(model).__name__]
    # The weights are already plain fp32 tensors (GGUF is dequantised at load); only the "gguf" quantizer marker blocks
    # save_pretrained, so drop it: the saved folder is an ordinary fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _check_same_weights(model, out)
    print(f"[export] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
