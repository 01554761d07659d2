"""Serve one base model with many LoRA adapters: an HTTP API and a small page, requests for different adapters
answered together in one batch.

    pip install fastapi uvicorn                                           # an optional extra
    python serve.py --checkpoint runs/smoke --checkpoint runs/smoke-r8    # http://127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/answer -H 'Content-Type: application/json' \\
        -d '{"context": "The trophy doesn'"'"'t fit into the brown suitcase because it'"'"'s too small.",
             "question": "What is too small?"}'

Endpoints: `GET /` a page (a context, a question, every adapter's answer side by side); `POST /v1/answer`
{"context", "question", "adapters": [names] (default: all), "max_new_tokens"} -> per adapter the answer, the
no-answer probability and the seconds its batch took; `GET /v1/adapters` what is loaded; `GET /health`.

The base is loaded once and every adapter beside it, unmerged (lora/multi.py): the answers are evaluate.py's for
each adapter. Requests that arrive within --max-wait-ms of each other are answered in one batch, up to
--max-batch-rows rows (one row per adapter asked), first come first served; beyond --max-queue waiting
requests the server answers 503 at once rather than letting a request wait behind a flood.
"""
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import argparse
import asyncio
import html
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

from data.prompts import WINOGRAD, format_text, prompt_tokens
from data.squad import SquadExample
from finetune.cli import at_least, resolve_device
from finetune.multi import AdapterInfo, answer_mixed, load_adapters
from finetune.precision import PRECISIONS, resolve_precision
from gpt2 import GPT, UserError, get_tokenizer

PAGE = Path(__file__).resolve().parent / "serve" / "page.html"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than a 1024-token context, far less than memory
MAX_TEXT_CHARS = 100_000  # tokenizing is linear, but no context this long fits the window anyway
MAX_NEW_TOKENS = 256
INSTALL = "serve.py needs FastAPI and uvicorn, an optional extra: pip install fastapi uvicorn"


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 503)."""


@dataclass
class Row:
    """One question for one adapter: a row of a batch."""
    example: SquadExample
    adapter: int
    max_new_tokens: int


@dataclass
class Job:
    rows: list[Row]
    result: Future  # -> (list of (answer, na_prob) per row, seconds the batch took)


class Batcher:
    """A short queue in front of the model. One worker thread takes the oldest waiting request, then collects more
    for at most `max_wait_s`, as long as the batch stays within `max_rows` rows, and answers them all with one call
    of `answer_rows`. Requests are served in arrival order (a request that does not fit the batch opens the next
    one), each batch waits at most max_wait_s for company, and at most `max_pending` requests wait: so a request
    waits for at most max_pending / (rows a batch takes) batches, and one that would wait longer is refused (Busy)."""

    def __init__(self, answer_rows: Callable[[list[Row]], list[tuple[str, float]]], max_rows: int,
                 max_wait_s: float, max_pending: int):
        self.answer_rows, self.max_rows, self.max_wait_s = answer_rows, max_rows, max_wait_s
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_pending)
        self.carried: Job | None = None  # a request that did not fit the last batch: first in the next one
        threading.Thread(target=self._work, daemon=True, name="batcher").start()

    def submit(self, rows: list[Row]) -> Future:
        if not 0 < len(rows) <= self.max_rows:
            raise ValueError(f"a request takes 1 to {self.max_rows} rows, not {len(rows)}")
        job = Job(rows, Future())
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.waiting.maxsize} requests are waiting already: retry in a moment") from None
        return job.result

    def _next_batch(self) -> list[Job]:
        jobs = [self.carried or self.waiting.get()]
        self.carried = None
        rows = len(jobs[0].rows)
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_rows:
            try:
                job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if rows + len(job.rows) > self.max_rows:
                self.carried = job
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            start = time.perf_counter()
            try:
                results = self.answer_rows([row for job in jobs for row in job.rows])
            except Exception as e:  # the batch fails, the server keeps serving
                for job in jobs:
                    job.result.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            for job in jobs:
                job.result.set_result((results[:len(job.rows)], seconds))
                results = results[len(job.rows):]


def model_rows(model: GPT, infos: Sequence[AdapterInfo]) -> Callable[[list[Row]], list[tuple[str, float]]]:
    """The Batcher's answer_rows for this model: one mixed-adapter generation per max_new_tokens in the batch."""
    def answer_rows(rows: list[Row]) -> list[tuple[str, float]]:
        results: list[tuple[str, float]] = [("", 0.0)] * len(rows)
        for max_new_tokens in {row.max_new_tokens for row in rows}:
            group = [i for i, row in enumerate(rows) if row.max_new_tokens == max_new_tokens]
            texts, na_probs = answer_mixed(model, [rows[i].example for i in group], [rows[i].adapter for i in group],
                                           [infos[rows[i].adapter].add_eos for i in group], max_new_tokens)
            for i, text, na_prob in zip(group, texts, na_probs):
                results[i] = (text, na_prob)
        return results
    return answer_rows


def prompt_problem(example: SquadExample, block_size: int, max_new_tokens: int) -> str | None:
    """Why this question cannot be answered whole within the model's window, or None if it can."""
    try:
        _, cut = prompt_tokens([example], block_size, max_new_tokens)
    except UserError as e:
        return str(e).replace("--max-new-tokens", "max_new_tokens")
    if cut:
        n = len(get_tokenizer().encode_ordinary(format_text(example.context, example.question)))
        return (f"context and question take {n} tokens; the model's window is {block_size} tokens, {max_new_tokens} "
                f"of them kept for the answer (max_new_tokens): shorten the context to fit "
                f"{block_size - max_new_tokens}")
    return None


def make_app(model: GPT, infos: Sequence[AdapterInfo], batcher: Batcher):
    """The FastAPI application. Errors are JSON {"detail": "..."} with a 4xx status for what the client can fix."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class AnswerRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        context: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
        question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
        adapters: list[str] | None = Field(default=None, min_length=1, description="default: every adapter")
        max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)

    by_name = {info.name: info for info in infos}
    page = PAGE.read_text().replace("$context", html.escape(WINOGRAD[0])).replace("$question", html.escape(WINOGRAD[1]))
    app = FastAPI(title="GPT-2 + LoRA adapters", docs_url=None, redoc_url=None)

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(exc).__name__}); the server keeps serving")  # no traceback

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters": len(infos), "waiting": batcher.waiting.qsize()}

    @app.get("/v1/adapters")
    async def adapters() -> dict:
        return {"adapters": [{k: v for k, v in asdict(info).items() if k != "index"} for info in infos]}

    @app.post("/v1/answer")
    async def answer(request: Request):
        body, size = bytearray(), 0
        async for chunk in request.stream():  # read to the end (the client then gets its answer), keep 1 MiB
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                body += chunk
        if size > MAX_BODY_BYTES:
            return error(413, f"the body has {size:,} bytes; at most {MAX_BODY_BYTES:,} are accepted")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return error(422, f"the body is not UTF-8 text (byte {e.start}): send JSON encoded in UTF-8")
        try:
            asked = AnswerRequest.model_validate_json(bytes(body))
        except ValidationError as e:  # the message of each problem, not the input (which may be large)
            return error(422, "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
                                        for err in e.errors()))
        names = asked.adapters or list(by_name)
        unknown = [name for name in names if name not in by_name]
        if unknown:
            return error(404, f"no adapter named {', '.join(map(repr, unknown))}; loaded: {', '.join(by_name)}")
        example = SquadExample("request", asked.context, asked.question, [])
        problem = prompt_problem(example, model.config.block_size, asked.max_new_tokens)
        if problem:
            return error(422, problem)
        rows = [Row(example, by_name[name].index, asked.max_new_tokens) for name in dict.fromkeys(names)]
        try:
            results, seconds = await asyncio.wrap_future(batcher.submit(rows))
        except Busy as e:
            return error(503, str(e))
        return {"answers": [{"adapter": infos[row.adapter].name, "answer": text, "no_answer_probability": na_prob,
                             "seconds": seconds} for row, (text, na_prob) in zip(rows, results)]}

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="an adapter to serve (repeat the flag for "
                   "more): a train.py --out directory (or its checkpoint.pt), a PEFT adapter directory, or the Hub "
                   "repository id of one; all on one base. Its name in the API is the text given here")
    p.add_argument("--model", help="the base model, a Hub repository id or a local path (default: the adapters' own)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=at_least(1), default=8000)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on GPUs that have it, else fp16; fp32 on a CPU")
    p.add_argument("--max-batch-rows", type=at_least(1), default=64, help="rows (question x adapter) in one batch")
    p.add_argument("--max-wait-ms", type=at_least(0), default=5, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=at_least(1), default=256, help="requests waiting beyond the running batch; "
                   "more are refused with 503")
    args = p.parse_args(argv)
    args.checkpoint = [c.rstrip("/") or c for c in args.checkpoint]
    repeated = {c for c in args.checkpoint if args.checkpoint.count(c) > 1}
    if repeated:
        p.error(f"--checkpoint {', '.join(sorted(repeated))} given more than once")
    if len(args.checkpoint) > args.max_batch_rows:
        p.error(f"--max-batch-rows {args.max_batch_rows} must hold one row for each of the {len(args.checkpoint)} "
                f"adapters")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(INSTALL) from None
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    model, infos = load_adapters(args.checkpoint, args.model, device, dtype)
    get_tokenizer()  # offline without its files, fail now rather than at every request
    batcher = Batcher(model_rows(model, infos), args.max_batch_rows, args.max_wait_ms / 1000, args.max_queue)
    for info in infos:
        print(f"adapter {info.name}: {info.variant}, rank {info.rank}, {', '.join(info.targets)}")
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(make_app(model, infos, batcher), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
