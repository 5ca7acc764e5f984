"""Data: tokenizer, corpus preparation, the default corpus, and batch loaders.

  tokenizer.py  Tokenizer (byte-level BPE: train, or load tokenizer.json / GPT-2 files), check_vocab
  sources.py    files, directories and datasets -> documents (formats, skips)
  hf.py         hf:NAME[:CONFIG][:SPLIT] and local dataset files through the `datasets` library (optional)
  prepare.py    prepare_data: documents -> tokenizer.json, meta.json, {text,code}_{train,val}.bin
  corpus.py     the default corpus (bundled prose + this Python's stdlib), built once into a cache
  build_corpus.py  a large corpus from this machine's Python sources and prose directories
  loader.py     TokenData: deterministic training windows (a pure function of the step) and evaluation windows
"""
from mm_rec.data.corpus import default_corpus_dir, ensure_default_corpus
from mm_rec.data.loader import TokenData, domains_for_rows
from mm_rec.data.prepare import prepare_data
from mm_rec.data.tokenizer import EOT_TOKEN, Tokenizer, check_vocab, train_tokenizer

__all__ = ["EOT_TOKEN", "TokenData", "Tokenizer", "check_vocab", "default_corpus_dir", "domains_for_rows",
           "ensure_default_corpus", "prepare_data", "train_tokenizer"]
