"""Exports ready for text: the training tokenizer travels into the HF export (files, chat template,
bos/eos/pad ids in config.json and generation_config.json) and transformers serves the export from
text; a tokenizer that does not fit the export fails at attach, naming the numbers."""

import json

import pytest
import torch

from megatron_trt_ext import ConfigError, ExportConfig, Exporter
from tests.support.models import randomize, tiny_llama
from tests.support.text_tokenizer import CHAT_TEMPLATE, SPECIALS, save_tokenizer, vocabulary

transformers = pytest.importorskip("transformers", reason="the export is loaded as users load it")
tokenizers = pytest.importorskip("tokenizers", reason="the test builds its tokenizer with it")

VOCAB = 120  # the model's table is padded to 128


def export(tmp_path, tokenizer_dir=None, **kw):
    model = tiny_llama()
    randomize(model, seed=11)
    config = ExportConfig(output_dir=str(tmp_path / "exports"), formats=["hf"], dtype="float32", vocab_size=VOCAB,
                          mode="sync", tokenizer_dir=None if tokenizer_dir is None else str(tokenizer_dir), **kw)
    exporter = Exporter(model, config)
    try:
        return exporter.export(iteration=1).path / "hf"
    finally:
        exporter.close()


def read_json(path):
    return json.loads(path.read_text())


def test_transformers_serves_the_export_from_text(megatron_world, tmp_path):
    source = save_tokenizer(tmp_path / "tok")
    hf_dir = export(tmp_path, source)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied as saved, never rewritten
        assert (hf_dir / name).read_bytes() == (source / name).read_bytes()

    # the ids: the tokenizer's, by construction pad 0, bos 1, eos 2, in both files
    want = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    config, generation = read_json(hf_dir / "config.json"), read_json(hf_dir / "generation_config.json")
    assert {k: config[k] for k in want} == want
    assert {k: generation[k] for k in want} == want

    # text in: the words' ids after the bos
    enc = tok("the cat sat on", return_tensors="pt")
    assert enc.input_ids.tolist() == [[1, 6, 7, 8, 9]]

    # the chat template travelled with the files
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|user|> hello world <|assistant|>"
    assert tok(chat).input_ids == [1, 4, 15, 16, 5]

    # greedy generation from text, stopping at the exported eos, matches a plain argmax loop
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    ids = enc.input_ids[0].tolist()
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == 2:
                break
    assert out == ids[enc.input_ids.shape[1]:]
    words = vocabulary()
    assert tok.decode(out, skip_special_tokens=True) == " ".join(words[i] for i in out if i >= len(SPECIALS))


def test_without_a_tokenizer_config_json_carries_no_token_ids(megatron_world, tmp_path):
    hf_dir = export(tmp_path)
    config = read_json(hf_dir / "config.json")
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(config)
    assert not (hf_dir / "tokenizer.json").exists()


def test_megatron_s_eod_joins_the_eos_ids(megatron_world, tmp_path):
    """Megatron-LM's EOD is the HF eos for a HuggingFaceTokenizer; where a run's EOD is another id,
    generation must stop at both."""
    hf_dir = export(tmp_path, save_tokenizer(tmp_path / "tok"), eod_token_id=7)
    assert read_json(hf_dir / "config.json")["eos_token_id"] == [2, 7]
    assert read_json(hf_dir / "generation_config.json")["eos_token_id"] == [2, 7]
    hf_dir = export(tmp_path / "same", save_tokenizer(tmp_path / "tok2"), eod_token_id=2)
    assert read_json(hf_dir / "config.json")["eos_token_id"] == 2


def test_a_tokenizer_without_pad_or_template_writes_null(megatron_world, tmp_path):
    """Missing ids are written as null, so LlamaConfig's default bos 1 / eos 2 never pass for the tokenizer's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(tmp_path / "tok"))
    hf_dir = export(tmp_path, tmp_path / "tok")
    config = read_json(hf_dir / "config.json")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, 1, None)
    assert read_json(hf_dir / "generation_config.json").get("bos_token_id") is None
    assert transformers.AutoConfig.from_pretrained(str(hf_dir)).bos_token_id is None
    assert transformers.AutoTokenizer.from_pretrained(str(hf_dir)).chat_template is None


def test_a_tokenizer_larger_than_the_export_fails_at_attach(megatron_world, tmp_path):
    big = save_tokenizer(tmp_path / "tok", size=136)
    with pytest.raises(ConfigError, match=r"tokenizer_dir.*136 ids.*vocab_size 120"):
        export(tmp_path, big)
    assert not (tmp_path / "exports").exists() or not list((tmp_path / "exports").glob("iter_*"))


def test_a_bad_tokenizer_dir_fails_at_attach(megatron_world, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ConfigError, match=r"tokenizer_dir: transformers cannot load a tokenizer from .*broken"):
        export(tmp_path, broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"tokenizer_dir.*empty.*holds no tokenizer file"):
        ExportConfig(tokenizer_dir=str(empty))
    with pytest.raises(ConfigError, match=r"eod_token_id.*set tokenizer_dir"):
        ExportConfig(eod_token_id=2)


def test_an_eod_outside_the_vocabulary_fails_at_attach(megatron_world, tmp_path):
    with pytest.raises(ConfigError, match=r"eod_token_id: 120 .*0\.\.119"):
        export(tmp_path, save_tokenizer(tmp_path / "tok"), eod_token_id=120)


def test_verify_expects_the_tokenizer_s_ids(megatron_world, tmp_path):
    """verify's config check derives config.json from the model's facts; the tokenizer's ids are
    part of what it expects (recorded in the manifest), and a changed id still fails it."""
    from megatron_trt_ext.verification.check import verify

    hf_dir = export(tmp_path, save_tokenizer(tmp_path / "tok"), verification={"enabled": False})
    report = verify(hf_dir.parent, record=False)
    config_check = next(c for c in report.data["checks"] if c["name"] == "config")
    assert config_check["ok"], report.lines()
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**read_json(path), "eos_token_id": 3}))
    config_check = next(c for c in verify(hf_dir.parent, record=False).data["checks"] if c["name"] == "config")
    assert config_check["ok"] is False and "eos_token_id" in config_check["detail"]


# ---------------------------------------------------------------------- training frameworks
def test_megatron_lm_hf_tokenizer_dir_fills_tokenizer_dir(tmp_path):
    from megatron_trt_ext.megatron_lm import add_export_args, config_from_args

    source = save_tokenizer(tmp_path / "tok")
    parser = argparse_with_megatron_tokenizer_flags()
    add_export_args(parser)
    args = parser.parse_args(["--export-dir", str(tmp_path / "x"), "--tokenizer-type", "HuggingFaceTokenizer",
                              "--tokenizer-model", str(source)])
    config = config_from_args(args, tokenizer_vocab=120, tokenizer_eod=2)
    assert (config.tokenizer_dir, config.eod_token_id, config.vocab_size) == (str(source), 2, 120)

    # an explicit directory wins; a Hub name is not a directory (nothing copied, nothing downloaded)
    other = save_tokenizer(tmp_path / "other")
    args.export_tokenizer_dir = str(other)
    assert config_from_args(args, tokenizer_eod=2).tokenizer_dir == str(other)
    args.export_tokenizer_dir, args.tokenizer_model = None, "meta-llama/Llama-3.1-8B"
    config = config_from_args(args, tokenizer_eod=2)
    assert (config.tokenizer_dir, config.eod_token_id) == (None, None)
    # other tokenizer types carry no HF files (NullTokenizer's EOD stays out of config.json)
    args.tokenizer_type, args.tokenizer_model = "NullTokenizer", None
    assert config_from_args(args, tokenizer_eod=120).tokenizer_dir is None


def test_offline_export_takes_the_tokenizer_the_checkpoint_s_args_name(tmp_path):
    """`megatron-trt-ext export` of a saved checkpoint reads the run's saved args: the same tokenizer
    directory as the live export (a HuggingFaceTokenizer's EOD is its eos, so the ids are the same)."""
    import types

    from megatron_trt_ext.megatron_lm import with_run_tokenizer

    source = save_tokenizer(tmp_path / "tok")
    saved = types.SimpleNamespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(source), rank=0)
    assert with_run_tokenizer(ExportConfig(output_dir=str(tmp_path)), saved).tokenizer_dir == str(source)
    for saved_file in source.iterdir():  # the directory was emptied since the run: an error naming the flag
        saved_file.unlink()
    with pytest.raises(ConfigError, match=r"tokenizer_dir.*holds no tokenizer file.*--tokenizer-model"):
        with_run_tokenizer(ExportConfig(output_dir=str(tmp_path)), saved)


def argparse_with_megatron_tokenizer_flags():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer-type", type=str, default=None)  # Megatron-LM's own flags
    parser.add_argument("--tokenizer-model", type=str, default=None)
    return parser


def test_bridge_callback_takes_the_run_s_hf_tokenizer(tmp_path):
    import types

    from megatron_trt_ext.bridge import _with_tokenizer

    source = save_tokenizer(tmp_path / "tok")
    settings = types.SimpleNamespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(source))
    state = types.SimpleNamespace(cfg=types.SimpleNamespace(tokenizer=settings),
                                  tokenizer=types.SimpleNamespace(eod=2, path=str(source)))
    config = _with_tokenizer(ExportConfig(output_dir=str(tmp_path)), state)
    assert (config.tokenizer_dir, config.eod_token_id) == (str(source), 2)
    settings.tokenizer_type = "NullTokenizer"
    assert _with_tokenizer(ExportConfig(output_dir=str(tmp_path)), state).tokenizer_dir is None
