"""megatron-trt-ext command line.

    megatron-trt-ext run [--cpu] SCRIPT [args]   run a Megatron-LM training script with exports on
                                                 (--cpu: CPU trial mode, for a laptop or CI)
    megatron-trt-ext export [--cpu] CKPT_DIR --recipe R --output-dir D [--iteration N]
                                                 export a saved torch_dist checkpoint (under torchrun too;
                                                 --cpu: CPU trial mode, as for run)
    megatron-trt-ext build EXPORT_DIR            build the engines of one complete export
    megatron-trt-ext build --watch ROOT [--once] build each new complete export under ROOT
    megatron-trt-ext verify EXPORT_DIR [--device cuda] [--json]
    megatron-trt-ext verify --all ROOT           checksums, then the HF export's logits against the
                                                 reference logits recorded at export time
    megatron-trt-ext ls ROOT [--json]            the exports under ROOT, newest first
    megatron-trt-ext recipes [--json]            the shipped recipes (by name: --recipe fp8)

Progress bars go to stderr when it is a terminal (--progress / --no-progress force them);
stdout carries only results (JSON with --json), for scripts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from .errors import ConfigError


def _build_options(args):
    from .engines.options import BuildOptions

    data = {}
    if args.recipe:
        import yaml

        from .recipes import resolve

        with open(resolve(args.recipe)) as f:
            data = (yaml.safe_load(f) or {}).get("build") or {}
    for flag in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "timeout"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    if args.devices is not None:
        data["devices"] = [int(d) for d in args.devices.split(",") if d.strip()]
    if args.deploy_check:
        data["deploy_check"] = True
    if not data:
        return None  # each export's own recipe decides
    return BuildOptions.from_dict(data, "build options")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after `run` belongs to the training script
        from .launch import main as launch

        return launch(argv[1:])
    parser = argparse.ArgumentParser(prog="megatron-trt-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a Megatron-LM training script (e.g. pretrain_gpt.py) with the --export-* flags; "
                              "run --cpu SCRIPT ...: CPU trial mode (laptop, CI), never for real training")
    e = sub.add_parser("export", help="export a saved torch_dist checkpoint (run under torchrun for several ranks)")
    e.add_argument("checkpoint", help="a Megatron-LM --save directory, or one of its iter_NNNNNNN directories")
    e.add_argument("--recipe", help="export recipe: a shipped one by name (megatron-trt-ext recipes) or a YAML "
                   "file; default: unquantized, hf + trtllm_checkpoint")
    e.add_argument("--output-dir", required=True)
    e.add_argument("--iteration", type=int, help="default: the checkpoint's latest")
    e.add_argument("--formats", help="comma-separated formats (overrides the recipe)")
    e.add_argument("--dtype")
    e.add_argument("--vocab-size", type=int, help="default: the saved tokenizer's size")
    e.add_argument("--inference-tp", type=int)
    e.add_argument("--inference-pp", type=int)
    e.add_argument("--tp", type=int, help="tensor parallel size used to load it (default: all ranks if it fits)")
    e.add_argument("--pp", type=int, help="pipeline parallel size used to load it")
    e.add_argument("--cpu", action="store_true", help="CPU trial mode (laptop, CI; as `run --cpu`): hides the GPUs "
                   "and maps Megatron's CUDA calls to the CPU; never for real exports")
    b = sub.add_parser("build", help="build TensorRT-LLM engines of exports (outside training)")
    b.add_argument("export_dir", nargs="?", help="an iter_XXXXXXX export with a complete manifest")
    b.add_argument("--watch", metavar="ROOT", help="build every new complete export under ROOT as it lands")
    b.add_argument("--once", action="store_true", help="with --watch: build what is there, then exit")
    b.add_argument("--poll", type=float, default=10.0, help="with --watch: seconds between scans")
    b.add_argument("--recipe", help="take the build: section of this recipe")
    b.add_argument("--max-batch-size", type=int)
    b.add_argument("--max-input-len", type=int)
    b.add_argument("--max-seq-len", type=int)
    b.add_argument("--max-num-tokens", type=int)
    b.add_argument("--devices", help="comma-separated CUDA device indices")
    b.add_argument("--timeout", type=int)
    b.add_argument("--deploy-check", action="store_true")
    v = sub.add_parser("verify", help="check an export: checksums, and its HF logits against the reference "
                                      "logits recorded at export time (exit 0 pass, 1 fail, 2 bad input)")
    v.add_argument("export_dir", nargs="?", help="an iter_XXXXXXX export directory")
    v.add_argument("--all", metavar="ROOT", help="verify every complete export under ROOT")
    v.add_argument("--device", default="cpu", help="where transformers runs the model (cpu, cuda, cuda:1)")
    v.add_argument("--engine", default="transformers", choices=("transformers", "vllm"),
                   help="what runs the probe's tokens: transformers (default) or vLLM, the serving engine "
                        "(needs vLLM installed: pip install 'megatron-trt-ext[serve]')")
    v.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    v.add_argument("--no-record", action="store_true", help="do not write the result into the manifest")
    r = sub.add_parser("recipes", help="list the shipped recipes: what each writes (use one by name)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    ls = sub.add_parser("ls", help="list the exports under a root, newest first")
    ls.add_argument("root", help="an export root (the output_dir of the recipe)")
    ls.add_argument("--json", action="store_true", help="print the list as JSON on stdout")
    for command in (e, b, v):
        bars = command.add_mutually_exclusive_group()
        bars.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show progress bars on stderr (default: when stderr is a terminal)")
        bars.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.command == "export":
        return run_export(args)
    if args.command == "verify":
        return run_verify(args)
    if args.command == "ls":
        return run_ls(args)
    if args.command == "recipes":
        return run_recipes(args)
    if bool(args.export_dir) == bool(args.watch):
        return run_build(None, None, error="build: give either EXPORT_DIR or --watch ROOT")
    try:
        options = _build_options(args)
    except ConfigError as exc:
        return run_build(None, None, error=str(exc))
    return run_build(args.export_dir, options, watch=args.watch, poll=args.poll, once=args.once,
                     progress=args.progress)


def run_export(args) -> int:
    """Exit status: 0 complete, 1 the export failed, 2 bad input."""
    if args.cpu:
        try:
            _cpu_mode()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from .errors import ExportError
    from .offline import export_checkpoint

    from .progress import wanted

    formats = [f.strip() for f in args.formats.split(",")] if args.formats else None
    try:
        result = export_checkpoint(args.checkpoint, args.recipe, args.output_dir, iteration=args.iteration,
                                   tp=args.tp, pp=args.pp, formats=formats, dtype=args.dtype,
                                   vocab_size=args.vocab_size, inference_tp=args.inference_tp,
                                   inference_pp=args.inference_pp, progress=wanted(args.progress))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"status": result.status, "path": str(result.path), "iteration": result.iteration,
                          "bytes": result.bytes_written}))
    return 0


def _cpu_mode() -> None:
    """`export --cpu`: the launcher's CPU trial mode (`cpu_mode.activate`), before anything imports
    megatron. Only ever imported here and in the launcher, for the flag."""
    try:
        training = importlib.util.find_spec("megatron.training")
    except ModuleNotFoundError:  # no megatron at all
        training = None
    if training is None:  # the offline loader builds the model with it
        raise ConfigError("export --cpu: megatron.training is not importable; offline export builds the model "
                          "with Megatron-LM's builders (megatron-core >= 0.18's wheel, or a Megatron-LM checkout "
                          "on PYTHONPATH)")
    from . import cpu_mode

    cpu_mode.activate()


def run_build(export_dir, options, watch=None, poll: float = 10.0, once: bool = False, error=None,
              progress=None) -> int:
    """Build one export (or watch a root); print the record. Exit status: 0 built, skipped or not
    buildable by this TensorRT-LLM (recorded), 1 build failed, 2 bad input."""
    from .engines import runner
    from .progress import wanted

    try:
        if error:
            raise ConfigError(error)
        if watch:
            for export, record in runner.watch(watch, options, poll, once):
                print(f"{export}: {record['status']}", flush=True)
            return 0
        record = runner.build_export(export_dir, options, progress=wanted(progress))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0 if record["status"] in ("complete", "skipped", "no_tensorrt_backend") else 1


def run_verify(args) -> int:
    """Exit status: 0 every export passed, 1 one failed, 2 bad input (not an export, no export under
    the root, a bad flag)."""
    from .progress import bar, wanted
    from .verification.check import verify, verify_root

    show = wanted(args.progress)
    try:
        if bool(args.export_dir) == bool(args.all):
            raise ConfigError("verify: give either EXPORT_DIR or --all ROOT")
        if args.all:
            reports = verify_root(args.all, args.device, record=not args.no_record, progress_enabled=show,
                                  engine=args.engine)
        else:
            with bar(3, "verify", show) as progress:
                reports = [verify(args.export_dir, args.device, record=not args.no_record, progress=progress,
                                  engine=args.engine)]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        data = [r.data for r in reports]
        print(json.dumps(data if args.all else data[0], indent=2))
    else:
        for report in reports:
            print("\n".join(report.lines()))
    return 0 if all(r.passed for r in reports) else 1


def run_ls(args) -> int:
    """Exit status: 0 listed (possibly nothing), 2 not a directory."""
    from .listing import list_exports, table

    try:
        rows = list_exports(args.root)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


def run_recipes(args) -> int:
    """Per shipped recipe: name, formats, dtype, quantization and KV cache, then its description
    (what it is and which engines load each format)."""
    from . import recipes

    rows = [recipes.summary(name) for name in recipes.names()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    import textwrap

    head = ("name", "formats", "dtype", "quantization", "kv cache")
    cells = [[r["name"], ",".join(r["formats"]) or "-", r["dtype"], r["algorithm"], r["kv_cache"]] for r in rows]
    widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    for row, cell in zip(rows, cells):
        print("  ".join(str(c).ljust(w) for c, w in zip(cell, widths)).rstrip())
        print(textwrap.fill(row["about"], width=100, initial_indent="    ", subsequent_indent="    "))
    print("\nUse one by name (--export-recipe fp8, megatron-trt-ext export --recipe fp8) or give a YAML file.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
