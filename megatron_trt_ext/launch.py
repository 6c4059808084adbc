"""Run a Megatron-LM training script, unmodified, with exports switched on.

    python -m megatron_trt_ext.launch [--cpu] [--] SCRIPT [script arguments, --export-* flags]
    torchrun --nproc-per-node 8 -m megatron_trt_ext.launch pretrain_gpt.py ... --export-recipe R --export-dir D
    megatron-trt-ext run [--cpu] pretrain_gpt.py ...

--cpu: CPU trial mode (`cpu_mode`, a laptop or CI; never for real training): hides the GPUs, maps
Megatron's CUDA calls to the CPU, adds the Megatron-LM flags a CPU run needs (gloo, local layers,
CPU initialisation, no fused CUDA kernels) where the script's arguments do not give them.

A single process started without torchrun (no RANK or WORLD_SIZE in the environment) gets
MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK=0, WORLD_SIZE=1 and LOCAL_RANK=0 where they are
unset, as Megatron-LM needs them; the log says so.

Installs the Megatron-LM hooks (`megatron_lm.install`: the script's own extra_args_provider is
chained, never replaced) and then runs SCRIPT as ``__main__`` with the remaining arguments, as
``python SCRIPT ...`` would (its directory first on ``sys.path``).

The script's directory goes on ``sys.path`` BEFORE anything imports ``megatron``: a Megatron-LM
checkout's ``megatron.training`` and ``megatron.core`` are the ones its script runs with, even where
megatron-core's wheel (which ships ``megatron.training`` too) is installed. The first log line names
the ``megatron`` that was imported (path and version).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import sys
from typing import Optional

from .errors import ConfigError
from .utils import free_port

logger = logging.getLogger("megatron_trt_ext")


def megatron_origin() -> str:
    """Where the imported ``megatron.training`` and ``megatron.core`` come from, and their version."""
    import megatron.core
    import megatron.training

    version = getattr(megatron.core, "__version__", None)
    if version is None:
        try:
            from megatron.core import package_info

            version = package_info.__version__
        except ImportError:
            version = "unknown version"
    return (f"megatron.training from {os.path.dirname(megatron.training.__file__)}, "
            f"megatron.core {version} from {os.path.dirname(megatron.core.__file__)}")


def single_process_env(environ=os.environ) -> dict:
    """Where no launcher set the rank (no RANK or WORLD_SIZE): the rendezvous variables of a
    one-process world that are unset, set in ``environ``. Returns what was set ({} under torchrun)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return {}
    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    added = {key: value if value is not None else str(free_port())
             for key, value in defaults.items() if key not in environ}
    environ.update(added)
    return added


def modelopt_import_problem(find_spec=importlib.util.find_spec) -> Optional[str]:
    """Why ``import modelopt.torch`` would fail although nvidia-modelopt is installed, or None.

    Megatron-LM's pretrain_gpt.py imports its ModelOpt pieces in ``try/except ImportError`` and,
    when that fails, passes no ``add_modelopt_args``: its ModelOpt flags vanish without a word.
    ModelOpt imports ``requests`` and ``huggingface_hub`` without declaring them (the ``quant``
    extra does)."""
    if find_spec("modelopt") is None:
        return None
    missing = [name for name in ("requests", "huggingface_hub") if find_spec(name) is None]
    if not missing:
        return None
    return (f"nvidia-modelopt is installed but {', '.join(missing)} is not, so `import modelopt.torch` fails: "
            "Megatron-LM's pretrain_gpt.py then leaves out its ModelOpt flags (--export-quant-cfg, ...) "
            "without a word, and quantized exports cannot run; pip install 'megatron-trt-ext[quant]' "
            f"(or {' '.join(missing)})")


def _options(argv: list) -> tuple:
    """The launcher's own options (before SCRIPT): ({"cpu": bool, "help": bool}, the rest)."""
    options = {"cpu": False, "help": False}
    while argv and argv[0].startswith("-"):
        flag, argv = argv[0], argv[1:]
        if flag == "--":
            break
        if flag == "--cpu":
            options["cpu"] = True
        elif flag in ("-h", "--help"):
            options["help"] = True
        else:
            raise ConfigError(f"launcher option {flag!r} is unknown: the launcher takes --cpu before SCRIPT; "
                              "the training script's own flags go after SCRIPT")
    return options, argv


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options, argv = _options(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not argv or options["help"]:
        print(__doc__, file=sys.stderr)
        return 0 if options["help"] else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"error: training script {script!r} not found; give the path of e.g. Megatron-LM's "
              "pretrain_gpt.py", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    # First on sys.path, as `python SCRIPT` would have it, before install() imports megatron.training.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    from .megatron_lm import install

    added_flags = []
    try:
        if options["cpu"]:
            from . import cpu_mode  # CPU trial mode: only ever imported here, for --cpu

            cpu_mode.activate()  # before anything imports megatron (megatron-core 0.19 needs Triton otherwise)
            added_flags = cpu_mode.cpu_flags(argv[1:])
        install()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("megatron-trt-ext launcher: %s", megatron_origin())
    if added_flags:
        logger.warning("megatron-trt-ext --cpu: added the Megatron-LM flags %s (your own flags win)",
                       " ".join(added_flags))
    rendezvous = single_process_env()
    if rendezvous:
        logger.info("megatron-trt-ext launcher: one process, not under torchrun (no RANK/WORLD_SIZE set): %s",
                    " ".join(f"{k}={v}" for k, v in rendezvous.items()))
    problem = modelopt_import_problem()
    if problem:
        logger.warning("megatron-trt-ext launcher: %s", problem)
    sys.argv = [script, *added_flags, *argv[1:]]
    if options["cpu"]:
        cpu_mode.run_script(script)
    else:
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
