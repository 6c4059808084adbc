"""Run a Megatron-LM training script, unmodified, with exports switched on.

    python -m megatron_trt_ext.launch [--] SCRIPT [script arguments, --export-* flags]
    torchrun --nproc-per-node 8 -m megatron_trt_ext.launch pretrain_gpt.py ... --export-recipe R --export-dir D
    megatron-trt-ext run pretrain_gpt.py ...

Installs the Megatron-LM hooks (`megatron_lm.install`: the script's own extra_args_provider is
chained, never replaced) and then runs SCRIPT as ``__main__`` with the remaining arguments, as
``python SCRIPT ...`` would (its directory first on ``sys.path``).

The script's directory goes on ``sys.path`` BEFORE anything imports ``megatron``: a Megatron-LM
checkout's ``megatron.training`` and ``megatron.core`` are the ones its script runs with, even where
megatron-core's wheel (which ships ``megatron.training`` too) is installed. The first log line names
the ``megatron`` that was imported (path and version).
"""

from __future__ import annotations

import logging
import os
import runpy
import sys

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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2 if not argv else 0
    script = argv[0]
    if not os.path.isfile(script):
        print(f"error: training script {script!r} not found; give the path of e.g. Megatron-LM's "
              "pretrain_gpt.py", file=sys.stderr)
        return 2
    # First on sys.path, as `python SCRIPT` would have it, before install() imports megatron.training.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    from .megatron_lm import install

    install()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("megatron-trt-ext launcher: %s", megatron_origin())
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
