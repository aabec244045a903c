"""`scale demo-data --language zh` and `scale tokenizer`: Chinese titles and tables, a vocabulary
trained on them that loses (almost) nothing to [UNK] where the packaged English MiniLM one loses
most, and a model that builds and decodes with it."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast

from datamodules import demo, demo_words_zh
from datamodules.collate import collate
from datamodules.decode import SampleDecoder
from datamodules.shards import write_shards
from datamodules.tokenizer_train import REPORT, read_corpus
from scale.cli import main
from scale.model import SCALE
from scale.pretrained_paths import load_tokenizer
from tests.conftest import tiny_config

CJK = re.compile(r"[\u4e00-\u9fff]")
# Text and images only (tiny): the text is what is tested, and it does not depend on the media.
SMALL = dict(image_size=16, missing={"video": 1.0, "audio": 1.0})


def _rows(meta: Path) -> list[dict]:
    return [json.loads(line) for line in meta.read_text().splitlines()]


def _scale(*args: str) -> str | int | None:
    """`scale ...` in this process: None on success, else the exit message or status."""
    try:
        main(list(args))
    except SystemExit as error:
        return error.code
    return None


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def zh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Chinese demo release and the tokenizer `scale tokenizer --compare minilm` trains on it."""
    root = tmp_path_factory.mktemp("zh")
    demo.generate(root / "raw", 120, seed=0, language="zh", **SMALL)
    assert _scale("tokenizer", "--src", str(root / "raw"), "--out", str(root / "tok"), "--compare", "minilm") is None
    return {"root": root, "raw": root / "raw", "tok": root / "tok"}


def test_chinese_demo_titles_hold_category_words(zh: dict[str, Path]) -> None:
    rows = _rows(zh["raw"] / "meta.jsonl")
    nouns = set(demo_words_zh.NOUNS.values())
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        words = r["title"].split()
        assert CJK.search(r["title"]) and 2 <= len(set(words) & nouns) <= 3, r["title"]
        table = dict(pair.split("#:#") for pair in r["table"].split("#;#"))
        assert table[demo_words_zh.BRAND_KEY] in words and demo_words_zh.MODEL_KEY in table
        assert all(CJK.search(key) for key in table)
        for w in set(words) & nouns:
            votes[w][r["category"]] += 1
    # The planted signal: a category word names one category (but for the confused titles).
    word_category = {w: c.most_common(1)[0][0] for w, c in votes.items()}
    hits = [Counter(word_category[w] for w in set(r["title"].split()) & nouns).most_common(1)[0][0] == r["category"]
            for r in rows]  # fmt: skip
    assert 0.6 < sum(hits) / len(hits) < 0.95


def test_trained_tokenizer_loads_and_keeps_chinese(zh: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(str(zh["tok"]), local_files_only=True)
    assert isinstance(tok, BertTokenizerFast) and load_tokenizer(str(zh["tok"])) is not None
    assert (tok.pad_token_id, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == (0, "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert tok.tokenize("2024新款 连衣裙") == ["2024", "新", "款", "连", "衣", "裙"]  # a CJK character is a token
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json", REPORT} <= {p.name for p in zh["tok"].iterdir()}
    report = json.loads((zh["tok"] / REPORT).read_text(encoding="utf-8"))
    trained, minilm = report["tokenizers"]["trained"], report["tokenizers"]["minilm"]
    # Measured on this demo: trained 0 %, MiniLM about 64 % of all tokens (every title has some).
    assert trained["unk_share"] < 0.01 and minilm["unk_share"] > 0.2 and minilm["titles_with_unk"] > 0.9
    assert report["titles"] == 120 and trained["tokens_per_title"] > 5


def test_model_builds_and_decodes_with_the_trained_tokenizer(zh: dict[str, Path]) -> None:
    text = {"max_tokens": 64, "hidden": 32, "layers": 1, "heads": 2, "mlp": 64}
    config = tiny_config(modalities=["text", "table"], tokenizer=str(zh["tok"]), text=text)
    torch.manual_seed(0)
    model = SCALE(config)
    decoder = SampleDecoder(config)
    rows = _rows(zh["raw"] / "meta.jsonl")[:4]
    samples = [decoder({"__key__": r["id"], "json": json.dumps(r).encode()}) for r in rows]
    tok = load_tokenizer(str(zh["tok"]))
    ids = samples[0]["text"]["input_ids"]
    assert tok.unk_token_id not in ids.tolist()
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == rows[0]["title"].lower().replace(" ", "")
    embeddings = model.eval().embed(collate(samples))
    assert all(torch.isfinite(e).all() for e in embeddings.values())


def test_every_layout_and_shards_give_the_same_corpus(zh: dict[str, Path]) -> None:
    root = zh["root"]
    demo.generate(root / "official", 120, seed=0, language="zh", layout="official", **SMALL)
    write_shards(zh["raw"], root / "shards", max_count=50)
    texts = [read_corpus(src) for src in (zh["raw"], root / "official", root / "shards", root / "official/products.json")]
    assert all(sorted(c.titles) == sorted(texts[0].titles) and sorted(c.table_texts) == sorted(texts[0].table_texts)
               for c in texts)  # fmt: skip
    assert _scale("tokenizer", "--src", str(root / "shards"), "--out", str(root / "tok_shards")) is None
    assert json.loads((root / "tok_shards" / REPORT).read_text(encoding="utf-8"))["tokenizers"]["trained"]["unk_share"] < 0.01


def test_bad_input_and_non_empty_out_are_one_line(zh: dict[str, Path], tmp_path: Path) -> None:
    before = _hashes(zh["tok"])
    refused = _scale("tokenizer", "--src", str(zh["raw"]), "--out", str(zh["tok"]))
    assert "tokenizer --out" in refused and "not empty" in refused and "\n" not in refused
    assert _hashes(zh["tok"]) == before  # nothing written over
    assert "not found" in _scale("tokenizer", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "a"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "meta.jsonl").write_text('{"id": "p1", "title": "", "table": ""}\n{"broken\n')
    refused = _scale("tokenizer", "--src", str(tmp_path / "blank"), "--out", str(tmp_path / "b"))
    assert "no title or table text" in refused and "1 unreadable record)" in refused
    assert "neither a release" in _scale("tokenizer", "--src", str(tmp_path), "--out", str(tmp_path / "c"))
    assert "--compare nowhere" in _scale("tokenizer", "--src", str(zh["raw"]), "--out", str(tmp_path / "c"),
                                         "--compare", "nowhere")
    assert not any((tmp_path / name).exists() for name in "abc")
    assert _scale("tokenizer", "--src", str(zh["raw"]), "--out", str(tmp_path / "d"), "--vocab-size", "3") is not None
    # --overwrite replaces it whole.
    assert _scale("tokenizer", "--src", str(zh["raw"]), "--out", str(zh["tok"]), "--overwrite", "--min-frequency", "3") is None
    assert json.loads((zh["tok"] / REPORT).read_text(encoding="utf-8"))["min_frequency"] == 3
