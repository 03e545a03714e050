"""Files the package ships: the bundled tokenizer (a small byte-level BPE), used by the embedded
demo and by runs that name no tokenizer and no Hugging Face base."""

import os

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
