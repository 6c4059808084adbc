"""Test entry point: the project's CLI (`megatron-trt-ext ...`) with ``export`` in the package's
CPU trial mode (``export --cpu``), under torchrun too. Kept so the tests' command lines stay short;
it adds nothing the installed CLI lacks."""

import sys

from megatron_trt_ext.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["export"] and "--cpu" not in argv:
        argv.insert(1, "--cpu")
    sys.exit(main(argv))
