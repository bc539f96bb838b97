"""Tokenizers: Hugging Face tokenizer.json and SentencePiece behave as transformers' do."""

import json

import pytest
from data_helpers import sentence, train_sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxrm.data.templates import Template
from jaxrm.data.tokenizer import load_tokenizer
from jaxrm.errors import UserError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE with a BOS post-processor, like Llama 3's."""
    import random

    directory = tmp_path_factory.mktemp("hf")
    rng = random.Random(0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<|reward|>", "<|score|>"]
    )
    tokenizer.train_from_iterator([sentence(rng, 12) for _ in range(2000)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    return directory


def test_hf_tokenizer_adds_bos_like_its_post_processor(hf_dir):
    t = load_tokenizer(hf_dir)
    plain = t.encode("the quick fox")
    assert t.encode("the quick fox", add_special_tokens=True) == [t.bos_id, *plain]
    assert t.bos_id == 0 and t.eos_id == 1
    assert t.decode([t.bos_id, *plain]) == "the quick fox"


def test_hf_template_matches_the_whole_string_encoded(hf_dir):
    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    template = Template(load_tokenizer(hf_dir), "polar", max_length=512, reward_token="<|score|>")
    chosen, _ = template.polar("why", "dog", ["fox", "code"])
    text = "why\ndog<|reward|>why\nfox"
    expected = [*reference.encode(text).ids, reference.token_to_id("<|score|>")]
    assert chosen.tolist() == expected
    assert reference.token_to_id("<|reward|>") in chosen.tolist()


def test_sentencepiece_reads_tokenizer_config(tmp_path):
    model = train_sentencepiece(tmp_path / "sp")
    (model.parent / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "add_eos_token": True})
    )
    t = load_tokenizer(model.parent)
    assert t.encode("the fox", add_special_tokens=True) == [*t.encode("the fox"), t.eos_id]


def test_missing_or_unknown_tokenizer(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(UserError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "x.model")
