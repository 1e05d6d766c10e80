"""Text data for the language models (data.name text): sources, tokenizers, token shards, device windows."""

from raymoe.data.text.dataset import TextDataset, bits_per_byte, load_text_dataset
from raymoe.data.text.prepare import prepare_text_data
from raymoe.data.text.windows import eval_windows, sample_windows

__all__ = ["TextDataset", "bits_per_byte", "eval_windows", "load_text_dataset", "prepare_text_data",
           "sample_windows"]
