"""Third-party output that tells a user of this server nothing, filtered where it starts.

Each entry says what the line means, so it can be reconsidered when a library changes:

- DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
  it." (WARNING, on stdout, from deepspeed/accelerator/real_accelerator.py) whenever no CUDA device is visible.
  The server's own `plan:` line already names the device it runs on, so the line adds only alarm.
- transformers' "Loading weights: 100%|...| 272/272" progress bar: useful on a terminal, but in a log
  (container, file, journald) it is carriage-return garbage; it is turned off when stderr is not a terminal.
  (HF_HUB_DISABLE_PROGRESS_BARS=1 turns it off everywhere, as in any Hugging Face tool.)
"""

from __future__ import annotations

import logging
import sys

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
    if not sys.stderr.isatty():
        # transformers reads this state when it is imported (transformers.utils.logging._tqdm_active).
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
