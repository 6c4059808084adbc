"""Run a Megatron-LM training script, unmodified, with exports switched on.

    python -m megatron_trt_ext.launch [--] SCRIPT [script arguments, --export-* flags]
    torchrun --nproc-per-node 8 -m megatron_trt_ext.launch pretrain_gpt.py ... --export-recipe R --export-dir D
    megatron-trt-ext run pretrain_gpt.py ...

Installs the Megatron-LM hooks (`megatron_lm.install`: the script's own extra_args_provider is
chained, never replaced) and then runs SCRIPT as ``__main__`` with the remaining arguments, as
``python SCRIPT ...`` would (its directory first on ``sys.path``).
"""

from __future__ import annotations

import os
import runpy
import sys


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
    from .megatron_lm import install

    install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
