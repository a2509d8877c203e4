"""Third-party output that tells a user of this server nothing, filtered where it starts.

Each entry says what the line means, so it can be reconsidered when a library changes:

- DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
  it." (WARNING, on stdout, from deepspeed/accelerator/real_accelerator.py) whenever no CUDA device is visible.
  The server's own `plan:` line already names the device it runs on, so the line adds only alarm.
- transformers >= 5.24 warns "`past_key_values` is deprecated and will be removed in version 5.40.0 for
  `...ForCausalLM.forward`. Use `cache` instead." (FutureWarning) on the first forward pass. It is about this
  server's own call (handlers/model_runner.py), not about anything the user configured; pyproject.toml keeps
  transformers below 5.40 until the call changes.
- transformers' "Loading weights: 100%|...| 272/272" progress bar: useful on a terminal, but in a log
  (container, file, journald) it is carriage-return garbage; it is turned off when stderr is not a terminal.
  (HF_HUB_DISABLE_PROGRESS_BARS=1 turns it off everywhere, as in any Hugging Face tool.)
"""

from __future__ import annotations

import logging
import sys
import warnings

#: messages of DeepSpeed's logger ("DeepSpeed") dropped by prefix
DEEPSPEED_NOISE = ("Setting accelerator to CPU.",)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_installed = False


def quiet_third_party() -> None:
    """Install the filters above (once per process; before DeepSpeed and transformers are imported, so their
    first lines are caught too)."""
    global _installed
    if _installed:
        return
    _installed = True
    # DeepSpeed's logger is created when deepspeed is imported (deepspeed.utils.logging); getLogger returns
    # that same object, and its own setup keeps filters already attached.
    logging.getLogger("DeepSpeed").addFilter(_DropPrefixes(DEEPSPEED_NOISE))
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    if not sys.stderr.isatty():
        # transformers reads this state when it is imported (transformers.utils.logging._tqdm_active).
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
