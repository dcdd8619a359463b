"""Baseline (b): the tutorial's design — one process, one `model.generate` per request, one request at a time.

This is what the usual "serve a Hugging Face model with FastAPI" tutorial builds: the model loaded once in the web
process, each request runs `model.generate(..., streamer=TextIteratorStreamer)` in a thread and the endpoint streams the
streamer's text. Requests are served one at a time (a lock around generate), as in the tutorial where concurrent
generates on one model are not supported. OpenAI-compatible enough for bench/loadgen.py: POST /v1/chat/completions with
`messages`, `max_tokens`, `temperature`, `stream`, and vLLM's `ignore_eos` (→ `min_new_tokens = max_tokens`); the last
chunk carries `usage`. Same model, same fp32 load as the worker (bench_model.load_bundled_model).

Usage: python bench/baselines/tutorial_server.py --port 8001
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import TextIteratorStreamer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import load_bundled_model  # noqa: E402

MODEL_ID = "smollm2-135m-instruct"
model, tokenizer = load_bundled_model()
generate_lock = threading.Lock()  # one generate at a time
app = FastAPI()


def _chunk(cid: str, delta: dict, finish=None, usage=None) -> str:
    obj = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL_ID,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        obj["usage"] = usage
    return f"data: {json.dumps(obj)}\n\n"


def _gen_kwargs(body: dict, inputs) -> dict:
    max_new = int(body.get("max_tokens") or 256)
    temp = float(body.get("temperature", 1.0))
    kw = dict(**inputs, max_new_tokens=max_new, do_sample=temp > 0, pad_token_id=tokenizer.eos_token_id)
    if temp > 0:
        kw["temperature"] = temp
    if body.get("ignore_eos"):
        kw["min_new_tokens"] = max_new
    return kw


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "bench"}]}


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    prompt_len = int(inputs["input_ids"].shape[-1])
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if not body.get("stream"):
        with generate_lock:
            with torch.inference_mode():
                out = model.generate(**_gen_kwargs(body, inputs))
        new = out[0, prompt_len:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": MODEL_ID,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "length"}],
                             "usage": {"prompt_tokens": prompt_len, "completion_tokens": int(new.shape[0]),
                                       "total_tokens": prompt_len + int(new.shape[0])}})

    def events():  # a sync generator: Starlette iterates it in its thread pool, as in the tutorial
        with generate_lock:
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            result = {}

            def run():
                with torch.inference_mode():
                    result["out"] = model.generate(**_gen_kwargs(body, inputs), streamer=streamer)

            thread = threading.Thread(target=run)
            thread.start()
            yield _chunk(cid, {"role": "assistant", "content": ""})
            for text in streamer:
                if text:
                    yield _chunk(cid, {"content": text})
            thread.join()
        n = int(result["out"].shape[-1]) - prompt_len
        yield _chunk(cid, {}, finish="length",
                     usage={"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
