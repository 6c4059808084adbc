"""Build orchestration, without importing tensorrt_llm: each step is a subprocess running
`build.engine`, so a crash, a hang (killed at ``timeout``) or a missing package is recorded in the
export's manifest and never reaches training.

Engines go to ``<export>/.trtllm_engine.partial`` and are renamed to ``trtllm_engine`` when every
rank is built. The export carries a build lock meanwhile, so retention leaves it alone.

In training, builds run one at a time: an export that completes while the previous export's build
still runs gets no build of its own (builds would otherwise pile up on the GPUs, each as long as
the last); its manifest records ``build.status: skipped``, why, and the command that builds it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import manifest as mf
from .. import safe_fs
from ..errors import ConfigError
from .options import BuildOptions

logger = logging.getLogger("megatron_trt_ext")

RESULT_TAG = "MEGATRON_TRT_EXT_RESULT "

# export root -> (export dir, process) of the last in-training build this process started
_launched: dict = {}


def build_command(export_dir, options: BuildOptions) -> list:
    """The command that builds an export's engines (also what to run later by hand)."""
    return [sys.executable, "-m", "megatron_trt_ext.engines", str(export_dir),
            "--options", json.dumps(options.to_dict(), sort_keys=True)]


def launch_after_export(config, rank: int, result) -> None:
    """Rank 0 starts the engine build of a complete export when the recipe asks for engines, unless
    the build it started for an earlier export still runs: then the export is recorded as not
    built (``build.status: skipped``, the running build, the command to build it later)."""
    if "trtllm_engine" not in config.formats or rank != 0 or not result.ok:
        return
    export = Path(result.path)
    root = str(export.parent.resolve())
    previous = _launched.get(root)
    # running: the process lives and still holds its export's build lock (released once the
    # manifest has the result; the process may take a moment more to exit)
    if previous is not None and previous[1].poll() is None and mf.is_being_read(previous[0]):
        running, proc = previous
        record = {"status": "skipped",
                  "reason": f"the engine build of {running.name} (pid {proc.pid}) was still running; in-training "
                            "builds run one at a time. Run the command to build this export later",
                  "command": shlex.join(build_command(export, config.build))}
        mf.update_manifest(export, build=record)
        logger.warning("no engine build for %s: %s", export.name, record["reason"])
        return
    _launched[root] = (export, launch_detached(export, config.build))


def launch_detached(export_dir, options: BuildOptions) -> subprocess.Popen:
    """Start a build of one export in its own session, off the training path; it records its
    result in the manifest. The lock is taken before the build process even starts."""
    proc = subprocess.Popen(build_command(export_dir, options), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    mf.write_build_lock(export_dir, proc.pid)
    return proc


def require_complete_export(export_dir) -> dict:
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ConfigError(f"export dir {str(export_dir)!r}: not a directory; pass an iter_XXXXXXX export directory")
    try:
        manifest = mf.read_manifest(export_dir)
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("status") != "complete":
        raise ConfigError(f"export dir {str(export_dir)!r}: no complete manifest.json (status "
                          f"{manifest.get('status', 'missing')!r}); only complete exports can be built. "
                          "Wait for the export to finish, or pick another one")
    return manifest


def _step(args: list, timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "megatron_trt_ext.engines.engine", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s: {shlex.join(cmd)}"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {"ok": True, **json.loads(line[len(RESULT_TAG):])}
    tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
    return {"ok": False, "error": f"exit code {done.returncode}: " + "\n".join(tail)}


def build_slots(options: BuildOptions) -> list:
    """The CUDA_VISIBLE_DEVICES value of each concurrent rank build. ``options.devices`` (default:
    every device torch sees) are indices among this process's visible devices, as torch numbers
    them; a child is given the device as the user named it (under CUDA_VISIBLE_DEVICES=4,5,6,7,
    index 0 is "4"), never the index, which the child would read as another physical GPU. With no
    device visible: one build at a time, in this process's environment (the builder says why it
    fails)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in visible.split(",")] if visible is not None else None
    indices = list(options.devices) if options.devices is not None else list(range(torch.cuda.device_count()))
    if not indices:
        return [None]
    if names is None:
        return [str(i) for i in indices]
    missing = [i for i in indices if i >= len(names) or not names[i]]
    if missing:
        raise ConfigError(f"build.devices: {missing} are not among the {len([n for n in names if n])} visible "
                          f"device(s) (CUDA_VISIBLE_DEVICES={visible}); devices are indices among the visible "
                          "devices")
    return [names[i] for i in indices]


def _build_ranks(export_dir: Path, world: int, options: BuildOptions, devices: list, progress: bool = False) -> tuple:
    """One subprocess per rank, as many at a time as there are devices (`build_slots`)."""
    from ..progress import bar

    with bar(world, f"build {export_dir.name}", progress, unit="rank") as ranks:
        return _run_rank_builds(export_dir, world, options, devices, ranks.update)


def _run_rank_builds(export_dir: Path, world: int, options: BuildOptions, devices: list, rank_done) -> tuple:
    partial = export_dir / ".trtllm_engine.partial"
    safe_fs.remove_tree(partial)
    safe_fs.make_dir(partial)
    logs = safe_fs.make_dir(export_dir / "build_logs", exist_ok=True)
    opts = json.dumps(options.to_dict())
    pending = list(range(world))
    running: dict = {}
    results: dict = {}
    deadline = time.monotonic() + options.timeout
    while pending or running:
        free = [d for d in devices if d not in running.values()]
        while pending and free:
            rank, device = pending.pop(0), free.pop(0)
            env = dict(os.environ) if device is None else {**os.environ, "CUDA_VISIBLE_DEVICES": device}
            cmd = [sys.executable, "-m", "megatron_trt_ext.engines.engine", "rank",
                   str(export_dir / "trtllm_checkpoint"), str(rank), str(partial), opts]
            # builders log a lot: a file, never a pipe (and never through a planted link)
            log = os.fdopen(safe_fs.open_new(logs / f"rank{rank}.log", access=os.O_RDWR), "w+")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
            running[(rank, proc, log)] = device
        for (rank, proc, log) in list(running):
            timed_out = time.monotonic() >= deadline
            if proc.poll() is None and not timed_out:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            del running[(rank, proc, log)]
            log.seek(0)
            lines = log.read().splitlines()
            log.close()
            tagged = [ln for ln in lines if ln.startswith(RESULT_TAG)]
            if tagged and proc.returncode == 0:
                results[rank] = {"ok": True, **json.loads(tagged[-1][len(RESULT_TAG):])}
            else:
                why = f"timed out after {options.timeout} s" if timed_out else f"exit code {proc.returncode}"
                results[rank] = {"ok": False, "error": f"{why} (log: {logs / f'rank{rank}.log'}): "
                                 + "\n".join(lines[-12:])}
            rank_done()
        time.sleep(0.05)
    failed = {r: v["error"] for r, v in results.items() if not v["ok"]}
    if failed:
        return False, failed
    final = export_dir / "trtllm_engine"
    safe_fs.remove_tree(final)
    os.replace(partial, final)
    return True, {}


def build_export(export_dir, options: BuildOptions | None = None, progress: bool = False) -> dict:
    """Build (or record why not) the engines of one complete export; returns the manifest record.
    ``progress``: a bar over the inference ranks on stderr."""
    export_dir = Path(export_dir)
    manifest = require_complete_export(export_dir)
    options = options or BuildOptions.from_dict(manifest.get("config", {}).get("build"))
    command = shlex.join(build_command(export_dir, options))
    t0 = time.perf_counter()
    record = {"command": command}
    with mf.build_lock(export_dir):  # (re)takes the lock with this process's pid
        if importlib.util.find_spec("tensorrt_llm") is None:
            record.update(status="skipped", reason="tensorrt_llm is not installed in this environment; "
                          "run the command on a machine with TensorRT-LLM and a GPU")
        else:
            probe = _step(["probe"], timeout=300)
            record["tensorrt_llm_version"] = probe.get("version")
            if not probe["ok"]:
                record.update(status="failed", error=f"importing tensorrt_llm failed: {probe['error']}")
            elif not probe["tensorrt_backend"]:
                record.update(status="no_tensorrt_backend",
                              reason=f"TensorRT-LLM {probe['version']} has no TensorRT engine builder (removed "
                                     "after 1.2); deploy the HF export (hf/) with its PyTorch backend instead")
                if options.deploy_check and (export_dir / "hf").is_dir():
                    tp = manifest.get("inference", {}).get("tp", 1)
                    record["deploy_check"] = _step(["deploy-check", str(export_dir / "hf"), str(tp)],
                                                   timeout=options.timeout)
            elif not (export_dir / "trtllm_checkpoint").is_dir():
                record.update(status="failed", error="the export has no trtllm_checkpoint/ to build from")
            else:
                world = json.loads((export_dir / "trtllm_checkpoint" / "config.json").read_text())["mapping"]["world_size"]
                try:
                    devices = build_slots(options)
                except ConfigError as exc:
                    record.update(status="failed", error=str(exc))
                else:
                    ok, failures = _build_ranks(export_dir, world, options, devices, progress)
                    record.update(status="complete" if ok else "failed", ranks=world,
                                  engine_dir=str(export_dir / "trtllm_engine") if ok else None)
                    if failures:
                        record["error"] = {str(r): e for r, e in failures.items()}
        record["seconds"] = time.perf_counter() - t0
        mf.update_manifest(export_dir, build=record)
    return record


def watch(root, options: BuildOptions | None, poll_s: float = 10.0, once: bool = False) -> list:
    """Build each new complete export under ``root`` as it lands (for a separate inference node)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--watch {str(root)!r}: not a directory; pass the export root (ExportConfig.output_dir)")
    done = []
    while True:
        for export in mf.complete_exports(root):
            manifest = mf.read_manifest(export)
            if "build" in manifest or mf.is_being_read(export):
                continue
            done.append((export, build_export(export, options)))
        if once:
            return done
        time.sleep(poll_s)
