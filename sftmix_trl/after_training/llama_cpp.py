"""Where llama.cpp's own tools come from: its converter (`convert_hf_to_gguf.py` with the `gguf-py` beside it) and
its quantiser (`llama-quantize`, for the k-quants the converter cannot write).

A llama.cpp checkout named by `llama_cpp_dir` (or `$SFTMIX_LLAMA_CPP_DIR`) is used as it is. Otherwise a pinned copy
is fetched once from the package index: the source distribution of `llama-cpp-python` vendors llama.cpp with its
converter, and only the files needed are unpacked into the cache. The quantiser is compiled from that source with
CMake the first time a k-quant is asked for (minutes on a small CPU).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from sftmix_trl.demo_model import default_cache_dir
from sftmix_trl.errors import SFTMixError

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # the llama.cpp that release vendors
ENV_DIR = "SFTMIX_LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
# Parts of the vendored tree that neither the converter nor the quantiser's build reads (tests, docs, vocab files)
_SKIPPED = re.compile(r"^(docs|tests|benches|examples|\.github|models/ggml-vocab[^/]*|tools/(ui|server)/)")


class LlamaCppError(SFTMixError):
    """llama.cpp's converter or quantiser is missing or refused the model; the message says what to do."""


def cached_llama_cpp_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"llama.cpp-{LLAMA_CPP_COMMIT[:12]}"


def _is_checkout(path: Path) -> bool:
    return (path / CONVERTER).is_file() and (path / "gguf-py" / "gguf").is_dir()


def _fetch(target: Path) -> Path:
    """Download the pinned sdist with pip (no build) and unpack its llama.cpp, atomically, into `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching llama.cpp's converter: %s (source distribution, about 75 MB, once)", LLAMA_CPP_PYTHON)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run([*cmd, "-q", "-d", tmp, LLAMA_CPP_PYTHON], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            reason = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1][:300]
            raise LlamaCppError(
                f"llama.cpp's converter is not cached and {LLAMA_CPP_PYTHON} could not be fetched ({reason}): "
                f"connect to the package index once, or point `llama_cpp_dir` (or ${ENV_DIR}) at a llama.cpp checkout"
            )
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
        try:
            with tarfile.open(archives[0]) as archive:
                prefix = archive.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
                members = []
                for member in archive.getmembers():
                    relative = member.name[len(prefix) :]
                    if member.name.startswith(prefix) and relative and not _SKIPPED.match(relative):
                        member.name = relative
                        members.append(member)
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
                archive.extractall(staging, members=members, **safe)
            if not _is_checkout(staging):
                raise LlamaCppError(f"{LLAMA_CPP_PYTHON} does not vendor {CONVERTER} and gguf-py as expected")
            staging.rename(target)  # a folder that exists is complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def find_llama_cpp(llama_cpp_dir: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The llama.cpp folder to convert with: the one given, else `$SFTMIX_LLAMA_CPP_DIR`, else the pinned copy in the
    cache (fetched on first use)."""
    given = llama_cpp_dir or os.environ.get(ENV_DIR)
    if given:
        path = Path(os.path.expanduser(given))
        if not _is_checkout(path):
            raise LlamaCppError(f"{given} is no llama.cpp checkout: it lacks {CONVERTER} or gguf-py/")
        return path
    target = cached_llama_cpp_dir(cache_dir)
    if _is_checkout(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return _fetch(target)


def llama_cpp_version(root: Path) -> str:
    """What the card and the logs name: the pinned commit for the cached copy, else the checkout's git commit."""
    if root.name == cached_llama_cpp_dir(root.parent).name:
        return f"{LLAMA_CPP_COMMIT[:12]} (vendored by {LLAMA_CPP_PYTHON})"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{commit or 'unknown commit'} (checkout {root})"


def converter_env(root: Path) -> dict[str, str]:
    """The environment the converter runs in: its own gguf-py first (it inserts it itself unless NO_LOCAL_GGUF)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(root / "gguf-py")) if p)
    return env


def run_converter(root: Path, script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's Python converters in a subprocess (its gguf-py must not replace the installed one)."""
    cmd = [sys.executable, str(root / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=converter_env(root), cwd=root)


def converter_problem(output: str) -> str:
    """One line that says why a converter run failed, from its log."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern, say in (
        (r"Model (\S+) is not supported", "llama.cpp's converter does not know the architecture {0}"),
        (
            r"BPE pre-tokenizer was not recognized",
            "llama.cpp's converter does not know this tokenizer's pre-tokenizer",
        ),
        (r"No module named '([\w.]+)'", "llama.cpp's converter needs the Python package {0}: pip install {0}"),
    ):
        for line in lines:
            match = re.search(pattern, line)
            if match:
                return say.format(*match.groups())
    return "llama.cpp's converter failed: " + (lines[-1][:300] if lines else "no output")


def _quantize_in(root: Path) -> Path | None:
    for candidate in (
        root / "build" / "bin" / "llama-quantize",
        root / "build" / "bin" / "Release" / "llama-quantize",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_quantize(root: Path) -> Path:
    """llama.cpp's `llama-quantize`: built in `root/build`, else on PATH, else compiled now from `root` with CMake."""
    found = _quantize_in(root) or (Path(shutil.which("llama-quantize")) if shutil.which("llama-quantize") else None)
    if found:
        return found
    if not shutil.which("cmake") or not (root / "CMakeLists.txt").is_file():
        raise LlamaCppError(
            "the k-quants need llama.cpp's quantiser (llama-quantize), which is not built: install CMake and a C++ "
            "compiler, or put llama-quantize on PATH, or export q8_0/f16/bf16 (written by the converter itself)"
        )
    build = root / "build"
    jobs = str(os.cpu_count() or 1)
    # Shared libraries: the same build then serves llama-cpp-python (LLAMA_CPP_LIB_PATH=build/bin) in the benchmark;
    # the quantiser finds them through the build tree's RPATH. No HTTPS, app or server: the quantiser reads no URL.
    configure = ["cmake", "-S", str(root), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]  # fmt: skip
    logger.info("building llama.cpp's quantiser in %s (once; minutes on a small CPU)", build)
    started = time.monotonic()
    for cmd in (configure, ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", jobs]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise LlamaCppError(f"building llama-quantize failed: {tail[0][:300]}")
    logger.info("llama-quantize built in %.0f s", time.monotonic() - started)
    found = _quantize_in(root)
    if not found:
        raise LlamaCppError(f"the build in {build} produced no llama-quantize")
    return found
