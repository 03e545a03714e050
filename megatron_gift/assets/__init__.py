"""Files the package ships: the bundled tokenizer (a word-level vocabulary of 26 tokens: digits,
operators and the demo's words), used by the embedded demo and by runs that name no tokenizer
and no Hugging Face base."""

import os

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
