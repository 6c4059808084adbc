"""The training tokenizer in the Hugging Face export, so that an export can be served with text.

An export without its tokenizer can only be served with token ids (``vllm serve --skip-tokenizer-init``).
With ``tokenizer_dir`` (given, or derived from Megatron-LM's ``--tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR`` or from Megatron-Bridge's tokenizer config), the HF export gets:

* the tokenizer's files, copied byte for byte as the tokenizer saved them (its chat template
  travels in them: ``tokenizer_config.json`` and/or ``chat_template.jinja``; never re-rendered);
* its special-token ids in config.json and generation_config.json: ``bos_token_id``,
  ``eos_token_id`` (with Megatron's end-of-document id beside it where the run's EOD is another
  token) and ``pad_token_id``. All three are written, ``null`` where the tokenizer has none, so a
  model class's default ids (LlamaConfig's bos 1 / eos 2) never pass for the tokenizer's.

The tokenizer is loaded once, at attach, with transformers (the way every consumer of the export
loads it), so a directory transformers cannot load, or a vocabulary larger than the exported
embedding table, fails before training instead of producing an export that cannot be served.
The TensorRT-LLM checkpoint carries no tokenizer (TensorRT-LLM takes one separately: point it at
the export's ``hf/`` directory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

logger = logging.getLogger("megatron_trt_ext")

# Files a transformers tokenizer is saved as (fast and slow, BPE / WordPiece / SentencePiece /
# tiktoken) and the chat-template files transformers writes next to them. Only those present are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.tiktoken", "chat_template.jinja", "chat_template.json")
TEMPLATES_DIR = "additional_chat_templates"  # named templates beside the default one (transformers >= 4.54)
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class TokenizerFacts:
    """What an export takes from its tokenizer (picklable: the background worker writes it).

    Attributes:
        directory: where the files are copied from.
        files: their paths relative to ``directory``, in copy order.
        vocab_size: every id the tokenizer can produce (``len(tokenizer)``, added tokens included).
        ids: ``bos_token_id``, ``eos_token_id`` (an int, or a list when Megatron's EOD is another
            token) and ``pad_token_id``; None where the tokenizer has none.
        chat_template: whether the tokenizer carries a chat template.
    """

    directory: str
    files: tuple
    vocab_size: int
    ids: dict
    chat_template: bool

    def record(self) -> dict:
        """The manifest's ``tokenizer`` entry (what `verify` expects in config.json besides the model's keys)."""
        return {"files": list(self.files), "vocab_size": self.vocab_size, "ids": dict(self.ids),
                "chat_template": self.chat_template}


def manifest_ids(manifest: dict) -> dict:
    """The special-token ids an export's config.json carries, from its manifest ({} without a tokenizer)."""
    record = manifest.get("tokenizer")
    return dict(record.get("ids", {})) if isinstance(record, dict) else {}


def read(config, vocab_size: int) -> Optional[TokenizerFacts]:
    """The tokenizer of ``config.tokenizer_dir`` (None without one), checked against the exported
    ``vocab_size``. Raises ConfigError naming the directory and the fix."""
    if config.tokenizer_dir is None:
        if config.eod_token_id is not None:  # (ExportConfig refuses this; an unchecked config still may not)
            raise ConfigError("eod_token_id: set tokenizer_dir too (the EOD id is written beside the tokenizer's)")
        return None
    directory = Path(config.tokenizer_dir)
    tokenizer = _load(directory)
    size = len(tokenizer)
    if size > vocab_size:
        raise ConfigError(
            f"tokenizer_dir: the tokenizer in {str(directory)!r} has {size} ids, more than the exported "
            f"vocab_size {vocab_size}: the export could not embed every token it produces; give the tokenizer "
            f"the model was trained with, or set vocab_size to at least {size}")
    eod = config.eod_token_id
    if eod is not None and not 0 <= eod < vocab_size:
        raise ConfigError(f"eod_token_id: {eod} is not an id of the exported vocabulary (0..{vocab_size - 1}); "
                          "give the id Megatron's tokenizer uses for end of document")
    eos = tokenizer.eos_token_id
    if eod is not None and eod != eos:
        eos = eod if eos is None else [eos, eod]  # generation stops at either
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    return TokenizerFacts(directory=str(directory), files=_files(directory, tokenizer), vocab_size=size,
                          ids=ids, chat_template=bool(getattr(tokenizer, "chat_template", None)))


def _load(directory: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ConfigError(f"tokenizer_dir: {str(directory)!r} needs transformers to read the tokenizer's ids "
                          "(pip install 'megatron-trt-ext[hf]'), or leave tokenizer_dir unset") from exc
    try:  # never custom code, never the network: the export must load the same way elsewhere
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad directory
        raise ConfigError(f"tokenizer_dir: transformers cannot load a tokenizer from {str(directory)!r} "
                          f"({type(exc).__name__}: {str(exc).strip()[:300]}); give a directory saved with "
                          "save_pretrained (tokenizer.json / tokenizer_config.json)") from exc


def _files(directory: Path, tokenizer) -> tuple:
    names = list(TOKENIZER_FILES)
    for name in getattr(tokenizer, "vocab_files_names", {}).values():  # a tokenizer class's own file names
        if isinstance(name, str) and name not in names:
            names.append(name)
    files = [name for name in names if (directory / name).is_file()]
    templates = directory / TEMPLATES_DIR
    if templates.is_dir():
        files += sorted(f"{TEMPLATES_DIR}/{p.name}" for p in templates.iterdir() if p.is_file())
    return tuple(files)


def copy_files(facts: TokenizerFacts, destination: Path) -> None:
    """Copy the tokenizer's files into the HF export directory, byte for byte."""
    from .safe_fs import write_bytes

    for name in facts.files:
        target = Path(destination) / name
        if target.parent != Path(destination):
            target.parent.mkdir(exist_ok=True)
        write_bytes(target, (Path(facts.directory) / name).read_bytes())


# ---------------------------------------------------------------------- training frameworks
def dir_from_training(tokenizer_type: Optional[str], tokenizer_model: Any, where: str,
                      warn: bool = True) -> Optional[str]:
    """The tokenizer directory a Megatron-LM / Megatron-Bridge run names: ``tokenizer_model`` of a
    ``HuggingFaceTokenizer`` when it is a local directory. A Hub name is not resolved (exports never
    download): that is logged with the fix."""
    if tokenizer_type != "HuggingFaceTokenizer" or not tokenizer_model:
        return None
    path = Path(str(tokenizer_model)).expanduser()
    if path.is_dir():
        return str(path)
    if warn:
            logger.warning("%s: the tokenizer %r is not a local directory, so its files are not copied into "
                       "the exports (they are served with token ids only); give its saved directory as "
                       "tokenizer_dir", where, str(tokenizer_model))
    return None


def eod_of(tokenizer: Any) -> Optional[int]:
    """Megatron's end-of-document id of a built Megatron tokenizer (None when it has none)."""
    try:
        eod = tokenizer.eod
    except Exception:  # noqa: BLE001 - tokenizers without an EOD raise NotImplementedError
        return None
    return int(eod) if isinstance(eod, int) and not isinstance(eod, bool) else None
