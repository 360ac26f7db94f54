"""The serving check: vLLM's OpenAI-compatible server, started from its own environment, answers held-out
prompts sent concurrently over HTTP; its answers must be transformers' greedy answers, and the batch's
throughput and latency are measured.

vLLM pins its own torch and transformers, so it runs from another Python (`make serve-env` makes
.venv-serve); this process only starts it, talks HTTP to it, and stops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trellis.core.errors import TrellisError
from trellis.deploy.arguments import ServeArguments

logger = logging.getLogger(__name__)

REPORT_NAME = "serving_report"  # .md and .json
ANSWERS_NAME = "answers.jsonl"
SERVER_LOG = "vllm_server.log"
SERVED_NAME = "model"  # the name requests ask for (--served-model-name)


class ServingError(TrellisError):
    """A server that cannot start, or answers that differ from the model's own."""


def check_vllm(python: str) -> str:
    """vLLM's version in the serving environment, or the error that says how to make that environment."""
    fix = "run `make serve-env` (vLLM for CPU in .venv-serve), or set vllm_python to a Python with vLLM"
    if not Path(python).is_file():
        raise ServingError(f"vllm_python: {python} does not exist; {fix}")
    found = subprocess.run(
        [python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        raise ServingError(f"vllm_python: {python} cannot import vllm ({found.stderr.strip()[-300:]}); {fix}")
    return found.stdout.strip()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(args: ServeArguments, port: int) -> list[str]:
    return [
        args.vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args.model_name_or_path,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.concurrency),
        "--seed",
        str(args.seed),
        "--disable-log-stats",  # one line every 10 s; the report has the figures
        *(["--trust-remote-code"] if args.trust_remote_code else []),
        *args.vllm_args,
    ]


@contextmanager
def vllm_server(args: ServeArguments):
    """Start the server (its output in output_dir/vllm_server.log), wait until it answers /health, yield
    (its URL, the seconds it took to start), and stop it and its workers on the way out."""
    import requests

    port = _free_port()
    log_path = Path(args.output_dir, SERVER_LOG)
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU; the default takes 4
    command = server_command(args, port)
    logger.info("Starting vLLM: %s", " ".join(command))
    start = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise ServingError(
                    f"the vLLM server exited with code {server.returncode} while loading; the end of its log "
                    f"({log_path}):\n{_tail(log_path)}"
                )
            if time.monotonic() - start > args.startup_timeout:
                raise ServingError(
                    f"the vLLM server did not answer within startup_timeout ({args.startup_timeout:g} s); "
                    f"the end of its log ({log_path}):\n{_tail(log_path)}"
                )
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        startup = time.monotonic() - start
        logger.info("vLLM answers at %s after %.1f s", url, startup)
        yield url, startup
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine core and workers too), SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _ask_all(url: str, conversations: list[list[dict]], args: ServeArguments) -> list[dict]:
    import aiohttp

    limit = asyncio.Semaphore(args.concurrency)

    async def ask(session: aiohttp.ClientSession, messages: list[dict]) -> dict:
        body = {
            "model": SERVED_NAME,
            "messages": messages,
            "max_tokens": args.max_new_tokens,
            "temperature": 0.0,
            "seed": args.seed,
        }
        async with limit:
            sent = time.monotonic()
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                reply = await response.json()
                if response.status != 200:
                    raise ServingError(
                        f"the server answered HTTP {response.status}: {json.dumps(reply)[:500]}"
                    )
            return {
                "answer": reply["choices"][0]["message"]["content"],
                "completion_tokens": reply["usage"]["completion_tokens"],
                "latency_s": time.monotonic() - sent,
            }

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(ask(session, messages) for messages in conversations)))


def ask_concurrently(
    url: str, conversations: list[list[dict]], args: ServeArguments
) -> tuple[list[dict], float]:
    """Every conversation sent as a chat request, `concurrency` in flight at once: (replies, wall seconds)."""
    start = time.monotonic()
    replies = asyncio.run(_ask_all(url, conversations, args))
    return replies, time.monotonic() - start


def build_report(
    args: ServeArguments,
    vllm_version: str,
    startup_s: float,
    expected: list[str],
    replies: list[dict],
    wall_s: float,
    conversations: list[list[dict]],
) -> dict[str, Any]:
    import statistics

    same = [
        reply["answer"].strip() == answer.strip() for reply, answer in zip(replies, expected, strict=True)
    ]
    latencies = sorted(reply["latency_s"] for reply in replies)
    tokens = sum(reply["completion_tokens"] for reply in replies)
    return {
        "model": args.model_name_or_path,
        "vllm": vllm_version,
        "dtype": args.dtype,
        "prompts": len(replies),
        "concurrency": args.concurrency,
        "metrics": {
            "match_rate": sum(same) / len(same),
            "startup_s": startup_s,
            "wall_s": wall_s,
            "completion_tokens": tokens,
            "tokens_per_second": tokens / wall_s,
            "requests_per_second": len(replies) / wall_s,
            "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        },
        "min_match_rate": args.min_match_rate,
        "mismatches": [
            {"prompt": messages, "served": reply["answer"], "transformers": answer}
            for messages, reply, answer, ok in zip(conversations, replies, expected, same, strict=True)
            if not ok
        ],
    }


def report_markdown(report: dict) -> str:
    from trellis.core.tables import markdown_table, number

    m = report["metrics"]
    rows = [
        [
            "answers equal to transformers' greedy ones",
            f"{m['match_rate']:.1%} (at least {report['min_match_rate']:.0%})",
        ],
        ["output tokens/s (whole batch)", number(m["tokens_per_second"])],
        ["requests/s", number(m["requests_per_second"])],
        ["latency p50 / p95 (s)", f"{number(m['latency_p50_s'], 3)} / {number(m['latency_p95_s'], 3)}"],
        ["server start (s)", number(m["startup_s"], 3)],
    ]
    return (
        f"vLLM {report['vllm']} served `{report['model']}` ({report['dtype']}); {report['prompts']} held-out "
        f"chat requests, {report['concurrency']} in flight at once, greedy, {m['completion_tokens']} tokens "
        f"in {number(m['wall_s'], 3)} s.\n\n" + markdown_table(["", "measured"], rows) + "\n"
    )


def write_report(args: ServeArguments, report: dict, replies: list[dict], expected: list[str]) -> None:
    out = Path(args.output_dir)
    (out / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{REPORT_NAME}.md").write_text(report_markdown(report))
    with open(out / ANSWERS_NAME, "w") as answers:
        for reply, answer in zip(replies, expected, strict=True):
            answers.write(json.dumps({**reply, "transformers": answer}) + "\n")
