"""`scale tokenizer`: a WordPiece tokenizer trained on a release's own titles and property tables.

M5Product's titles and tables are Chinese. The packaged MiniLM vocabulary (`tokenizer: minilm`) is
English: most Chinese characters are not in it and become [UNK], so the text and table towers see
little more than the Latin brands and numbers. This command trains a vocabulary the way Chinese BERT
is built: BERT's normalizer with `handle_chinese_chars`, so every CJK character is a token of its
own (no Chinese word segmentation needed), and WordPiece for the Latin words (brands, model codes,
units); special tokens [PAD] [UNK] [CLS] [SEP] [MASK], [PAD] = 0.

    scale tokenizer --src RAW_OR_SHARDS --out DIR [--vocab-size 21128] [--min-frequency 2] [--compare minilm]

`--src` is a release folder in either layout (`datamodules/sources.py`), its metadata file, or a
converted shard folder (only the `json` members are read). Titles and the table's keys and values
are the corpus. DIR holds `tokenizer.json`, `tokenizer_config.json` and `vocab.txt`, which
`transformers.AutoTokenizer.from_pretrained(DIR)` loads and the model config takes as
`tokenizer: DIR` (the text tower then starts from scratch: `text.pretrained` must stay unset, a
pretrained BERT has its own vocabulary), and `unk_report.json`: the share of [UNK] tokens over the
corpus with this tokenizer and with each `--compare` one.

The corpus is held in memory (titles and table texts only, no media): about 1 GB for the 6 M
products of the full release.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.limits import DataLimits
from datamodules.sources import BadRecord, iter_products, open_source
from scale.outputs import output_folder
from scale.pretrained_paths import load_tokenizer
from scale.shard_format import IN_PROGRESS, RECORD_MEMBER, SIZES_FILE, list_shards, parse_table, split_member

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""In this order: [PAD] gets id 0, as BERT's padding (the model pads with the tokenizer's id anyway)."""
REPORT = "unk_report.json"
TRAINED = "trained"
"""The new tokenizer's name in the report."""
_BATCH = 10_000  # texts per tokenizer call: the fast tokenizer's batch path, without one huge list


@dataclass
class Corpus:
    """The text of a release: each title, and each table key and value, as one string."""

    titles: list[str] = field(default_factory=list)
    table_texts: list[str] = field(default_factory=list)
    products: int = 0
    bad_records: int = 0

    def texts(self) -> Iterator[str]:
        yield from self.titles
        yield from self.table_texts

    def add(self, record: dict[str, Any]) -> None:
        """One product's title and table (a non-string or empty field is no text)."""
        self.products += 1
        title, table = record.get("title"), record.get("table")
        if isinstance(title, str) and title.strip():
            self.titles.append(title.strip())
        if isinstance(table, str):
            self.table_texts.extend(text for pair in parse_table(table) for text in pair)


def _is_shards(src: Path) -> bool:
    if src.is_file():
        return src.suffix == ".tar"
    return (src / SIZES_FILE).is_file() or (src / IN_PROGRESS).is_dir() or any(src.glob("*.tar"))


def read_corpus(src: str | Path) -> Corpus:
    """Titles and table texts of a release (either layout) or a shard folder; a one-line error
    (ValueError / FileNotFoundError naming --src) for one that is missing, unreadable or textless."""
    src = Path(src)
    corpus = Corpus()
    try:
        if not src.exists():
            raise FileNotFoundError(f"tokenizer --src {src}: not found (expected a release folder with meta.jsonl "
                                    "or an official *.json, its metadata file, or a shard folder)")  # fmt: skip
        if _is_shards(src):
            for shard in [str(src)] if src.is_file() else list_shards(str(src)):
                for record in _shard_records(Path(shard), corpus):
                    corpus.add(record)
        else:
            if src.is_dir() and not (src / "meta.jsonl").is_file() and not any(src.glob("*.json")):
                raise FileNotFoundError(f"tokenizer --src {src}: neither a release (meta.jsonl or an official *.json) "
                                        "nor a shard folder (*.tar, sizes.json)")  # fmt: skip
            try:
                source = open_source(src)
            except (FileNotFoundError, ValueError) as error:  # its messages name `shards`: name this command
                raise type(error)(str(error).replace("shards --", "tokenizer --").replace("shards:", "tokenizer --src:")) from None
            for product in iter_products(source):
                if isinstance(product, BadRecord):
                    corpus.bad_records += 1
                else:
                    corpus.add(product.meta)
    except (FileNotFoundError, ValueError):
        raise
    except OSError as error:  # no permission, an I/O error: a reading problem, not a writing one
        raise ValueError(f"tokenizer --src {error.filename or src}: cannot read it ({error.strerror or error})") from None
    if not corpus.titles and not corpus.table_texts:
        bad = f"{corpus.bad_records} unreadable record{'s' * (corpus.bad_records != 1)}"
        raise ValueError(f"tokenizer --src {src}: no title or table text in its {corpus.products} products "
                         f"({bad}); nothing to train on")  # fmt: skip
    return corpus


def _shard_records(shard: Path, corpus: Corpus) -> Iterator[dict[str, Any]]:
    """The JSON records of one shard (other members are skipped unread; a bad record is counted)."""
    limit = DataLimits().max_json_member_bytes
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                parsed = split_member(member.name)
                if not member.isfile() or parsed is None or parsed[1] != RECORD_MEMBER:
                    continue
                try:
                    if member.size > limit:
                        raise ValueError("too large")
                    record = json.loads(tar.extractfile(member).read())
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                    corpus.bad_records += 1
                    continue
                yield record
    except tarfile.TarError as error:
        raise ValueError(f"tokenizer --src {shard}: not a readable tar shard ({error})") from None


def check_settings(vocab_size: int, min_frequency: int) -> None:
    """One line for a setting training cannot use, before any text is read."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer --vocab-size {vocab_size}: must be > {len(SPECIAL_TOKENS)} (the special tokens)")
    if min_frequency < 1:
        raise ValueError(f"tokenizer --min-frequency {min_frequency}: must be >= 1")


def train(corpus: Corpus, vocab_size: int = 21128, min_frequency: int = 2):
    """A BERT WordPiece tokenizer (a `transformers` fast tokenizer) trained on `corpus`.

    The alphabet may take the whole vocabulary (`limit_alphabet`): in Chinese text the characters
    are the tokens, and a character left out of the alphabet is [UNK] wherever it occurs, while a
    missing merge only splits a Latin word into more pieces."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    check_settings(vocab_size, min_frequency)
    wordpiece = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    wordpiece.train_from_iterator(corpus.texts(), vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), limit_alphabet=vocab_size - len(SPECIAL_TOKENS),
                                  show_progress=False)  # fmt: skip
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=True, tokenize_chinese_chars=True,
                             strip_accents=None, model_max_length=512)  # fmt: skip


def unk_share(tokenizer, corpus: Corpus) -> dict[str, float]:
    """How much of `corpus` `tokenizer` loses to [UNK]: the share of [UNK] among all tokens (titles
    and table texts, no special tokens), among title tokens and table tokens, the share of titles
    with any [UNK], and the mean tokens per title."""
    unk = tokenizer.unk_token_id

    def counts(texts: list[str]) -> tuple[int, int, int]:
        tokens = unks = with_unk = 0
        for start in range(0, len(texts), _BATCH):
            for ids in tokenizer(texts[start : start + _BATCH], add_special_tokens=False)["input_ids"]:
                n = ids.count(unk)
                tokens, unks, with_unk = tokens + len(ids), unks + n, with_unk + (n > 0)
        return tokens, unks, with_unk

    (t_tok, t_unk, t_with), (b_tok, b_unk, _) = counts(corpus.titles), counts(corpus.table_texts)
    share = lambda part, whole: round(part / whole, 6) if whole else 0.0  # noqa: E731
    return {"vocab_size": len(tokenizer), "unk_share": share(t_unk + b_unk, t_tok + b_tok),
            "title_unk_share": share(t_unk, t_tok), "table_unk_share": share(b_unk, b_tok),
            "titles_with_unk": share(t_with, len(corpus.titles)),
            "tokens_per_title": round(t_tok / len(corpus.titles), 2) if corpus.titles else 0.0}  # fmt: skip


def _table(report: dict[str, dict[str, float]]) -> Iterable[str]:
    yield f"{'tokenizer':<12} {'vocab':>7} {'[UNK] all':>10} {'titles':>8} {'tables':>8} {'titles w/ [UNK]':>16} {'tokens/title':>13}"
    for name, r in report.items():
        yield (f"{name[-12:]:<12} {r['vocab_size']:>7} {r['unk_share']:>10.2%} {r['title_unk_share']:>8.2%} "
               f"{r['table_unk_share']:>8.2%} {r['titles_with_unk']:>16.1%} {r['tokens_per_title']:>13.1f}")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--src", required=True, help="a release folder (meta.jsonl or the official *.json), its metadata file, or a shard folder")
    a("--out", required=True, help="tokenizer folder, new or empty (tokenizer.json, vocab.txt, unk_report.json)")
    a("--overwrite", action="store_true", help="replace a non-empty --out (everything in it)")
    a("--vocab-size", type=int, default=21128, help="at most this many tokens (Chinese BERT's 21128); a small corpus gets fewer")
    a("--min-frequency", type=int, default=2, help="a merged WordPiece must occur this often")
    a("--compare", action="append", default=[], metavar="TOKENIZER",
      help="also report the [UNK] share of this tokenizer (`minilm` or a folder), repeatable")


def run(args: argparse.Namespace) -> None:
    """Reads the corpus, trains, writes DIR whole (or not at all) and prints the [UNK] report."""
    check_settings(args.vocab_size, args.min_frequency)
    compared = {}
    for name in args.compare:  # a bad name fails before any work
        try:
            compared[name] = load_tokenizer(name)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"tokenizer --compare {name}: {error}") from None
    with output_folder(args.out, args.overwrite, "tokenizer --out") as staging:
        corpus = read_corpus(args.src)
        start = time.perf_counter()
        tokenizer = train(corpus, args.vocab_size, args.min_frequency)
        seconds = time.perf_counter() - start
        tokenizer.save_pretrained(str(staging))
        tokenizer.backend_tokenizer.model.save(str(staging))  # vocab.txt, for readers of the plain vocabulary
        report = {TRAINED: unk_share(tokenizer, corpus), **{n: unk_share(t, corpus) for n, t in compared.items()}}
        (staging / REPORT).write_text(json.dumps({
            "src": str(args.src), "products": corpus.products, "bad_records": corpus.bad_records,
            "titles": len(corpus.titles), "table_texts": len(corpus.table_texts), "vocab_size_asked": args.vocab_size,
            "min_frequency": args.min_frequency, "train_seconds": round(seconds, 2), "tokenizers": report}, indent=1,
            ensure_ascii=False) + "\n", encoding="utf-8")  # fmt: skip
    print(f"tokenizer: {len(tokenizer)} tokens from {len(corpus.titles)} titles and {len(corpus.table_texts)} "
          f"table keys/values of {corpus.products} products in {seconds:.1f}s -> {args.out}")  # fmt: skip
    for line in _table(report):
        print(line)
