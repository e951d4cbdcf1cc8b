"""The baseline for bench_serve.py: a naive OpenAI-style server, one request at a time on Hugging Face `generate`.

It streams with transformers' TextIteratorStreamer and serves requests strictly one after another (no batching),
which is what a hand-written FastAPI wrapper around `generate` usually does.

    .venv/bin/python benchmarks/naive_hf_server.py MODEL_DIR [--port 0] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build(model_dir: str, dtype: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    app, lock = FastAPI(), asyncio.Lock()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt")["input_ids"]
        max_tokens = body.get("max_tokens", 16)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        kwargs = dict(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens

        async def events():
            async with lock:  # one request at a time
                worker = threading.Thread(target=lambda: model.generate(**kwargs), daemon=True)
                worker.start()
                while True:
                    piece = await asyncio.to_thread(next, streamer, None)
                    if piece is None:
                        break
                    if piece:
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n"
                worker.join()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class _Announcing(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f"naive: serving on http://{host}:{port}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    torch.manual_seed(0)
    app = build(a.model, a.dtype)
    _Announcing(uvicorn.Config(app, host="127.0.0.1", port=a.port, log_level="warning")).run()
