"""Text for calibration and evaluation that is on every machine: no downloads.

The default is the Python standard library's own documentation, `pydoc_data.topics` (the text `help()`
prints for language topics: ~465,000 characters in 79 topics, English prose with code). Its topics are
split by name into two disjoint halves, alternately in sorted order: the calibration half (SmoothQuant's
activation ranges and alpha search) and the evaluation half (`python -m entrypoint quality`'s
perplexity), so quality is always measured on text calibration never saw.

`option.smoothquant_calibration_data` replaces the calibration half with a UTF-8 text file of one's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_CALIBRATION = "pydoc_data.topics (calibration half)"


def pydoc_topics(half: str) -> list[str]:
    """The topic texts of one half: "calibration" (even positions in sorted order) or "evaluation" (odd)."""
    from pydoc_data.topics import topics

    offset = {"calibration": 0, "evaluation": 1}[half]
    names = sorted(topics)
    return [topics[name] for name in names[offset::2]]


def calibration_texts(path: str | None) -> tuple[list[str], str]:
    """(texts, description) from `path`, or the default calibration half when it is None."""
    if path is None:
        return pydoc_topics("calibration"), DEFAULT_CALIBRATION
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"smoothquant_calibration_data={path}: cannot read it as UTF-8 text ({error})") from None
    if not text.strip():
        raise ValueError(f"smoothquant_calibration_data={path}: the file is empty")
    return [text], str(file.resolve())


def token_windows(tokenizer, texts: list[str], count: int, length: int) -> torch.Tensor:
    """Up to `count` windows of `length` token ids [n, length]: the texts tokenized one after another
    (separated by the EOS token when there is one), cut into consecutive windows, spread evenly over the
    whole stream so they sample all of it. Fewer windows when the text is short; at least one."""
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    available = len(stream) // length
    if available == 0:
        if not stream:
            raise ValueError("the text yields no tokens")
        return torch.tensor([stream], dtype=torch.long)
    picks = min(count, available)
    starts = [round(i * available / picks) * length for i in range(picks)]
    return torch.tensor([stream[start:start + length] for start in starts], dtype=torch.long)
